"""The BigQuery Storage Write API, as the store uses it: blocking calls for worker threads.

Streams are created once and reused (CreateWriteStream is limited to 10,000 an hour per project
and region, and a call costs seconds under load); rows travel as Arrow record batches
(`arrow_rows`), each AppendRows call carrying one write's requests at consecutive offsets.
An answer is sorted here, once: ALREADY_EXISTS at an offset means those rows are already in the
stream (the same rows re-sent after a lost acknowledgement: success); OUT_OF_RANGE means an
earlier request of the call failed, so the rows are sent again from the last acknowledged
offset; a stream BigQuery closed is `StreamClosed`; rows BigQuery refused are a permanent
error naming them; the rest is an `api_core` exception for `bigquery_fault` to sort.
https://cloud.google.com/bigquery/docs/write-api
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import grpc
import pyarrow as pa
from google.api_core import exceptions as api_errors
from google.api_core.client_options import ClientOptions
from google.cloud.bigquery_storage_v1 import BigQueryWriteClient, types
from google.cloud.bigquery_storage_v1.services.big_query_write.transports import (
    BigQueryWriteGrpcTransport,
)

from ..config import BigQueryConfig
from ..errors import PermanentStoreError, StoreFault, TransientStoreError, UsageError
from .bigquery_arrow import Payload, serialized_schema
from .bigquery_client import credentials_for
from .bigquery_schema import TableNames

StreamType = types.WriteStream.Type
_TIMEOUT_S = 60.0
# Messages BigQuery (and the emulator) give for a stream that takes no more appends.
_CLOSED_MARKERS = ("finalized", "invalid stream name", "not found", "already committed")
_THROTTLED = (api_errors.ServiceUnavailable, api_errors.TooManyRequests)


class StreamClosed(StoreFault):
    """The stream takes no more appends (finalised, committed, expired or unknown): write to a
    new one. Not transient (retrying the same stream cannot help) nor permanent (a new stream
    can): the caller replaces the stream, or the whole write is retried. `acknowledged_rows`:
    how many rows of the call's first requests were in the stream before it closed."""

    def __init__(self, message: str, acknowledged_rows: int = 0) -> None:
        super().__init__(message)
        self.acknowledged_rows = acknowledged_rows


class OffsetOutOfRange(TransientStoreError):
    """An append beyond the stream's end: an earlier one failed; resend from the last
    acknowledged offset."""


def connect_write_api(config: BigQueryConfig, environ: Mapping[str, str]) -> BigQueryWriteClient:
    """A Write API client: plaintext gRPC to `write_api_endpoint` when the REST side is an
    emulator (`api_endpoint` set), else Google's endpoint (or `write_api_endpoint`) with the
    same credentials as the REST client."""
    if config.api_endpoint:
        if not config.write_api_endpoint:
            raise UsageError(
                "storage.bigquery.write_api_endpoint: required with api_endpoint (an emulator)"
            )
        channel = grpc.insecure_channel(config.write_api_endpoint)
        return BigQueryWriteClient(  # type: ignore[no-untyped-call]
            transport=BigQueryWriteGrpcTransport(channel=channel)
        )
    options = ClientOptions(api_endpoint=config.write_api_endpoint or None)
    return BigQueryWriteClient(  # type: ignore[no-untyped-call]
        credentials=credentials_for(environ), client_options=options
    )


class WriteApi:
    """One table's Write API calls. Every method blocks: run them on worker threads."""

    def __init__(self, client: BigQueryWriteClient, names: TableNames, schema: pa.Schema) -> None:
        self._client = client
        self._table = f"projects/{names.project}/datasets/{names.dataset}/tables/{names.table}"
        self._schema = types.ArrowSchema(serialized_schema=serialized_schema(schema))

    def create_stream(self, kind: StreamType) -> str:
        stream = self._client.create_write_stream(
            parent=self._table, write_stream=types.WriteStream(type_=kind), timeout=_TIMEOUT_S
        )
        return str(stream.name)

    def append(self, stream: str, payloads: Sequence[Payload], first_offset: int) -> None:
        """Append `payloads` at consecutive offsets from `first_offset`, in one call; returns
        when every one is in the stream (acknowledged, or ALREADY_EXISTS), else raises."""
        responses = self._client.append_rows(
            self._requests(stream, payloads, first_offset),
            retry=None,  # retried by the caller, with the same rows at the same offsets
            timeout=_TIMEOUT_S,
            # BigQuery routes a stream's appends to its region by this header (the official
            # AppendRowsStream sends it too); a bidi call cannot take it from the requests.
            metadata=(("x-goog-request-params", f"write_stream={stream}"),),
        )
        answered = acknowledged_rows = 0
        try:
            for response in responses:
                _check(response, payloads[answered], first_offset)
                acknowledged_rows += payloads[answered].rows
                answered += 1
                if answered == len(payloads):
                    break
        except StreamClosed as exc:
            exc.acknowledged_rows = acknowledged_rows
            raise
        except api_errors.GoogleAPICallError as exc:
            if _is_closed(exc.message or str(exc)) and not isinstance(exc, _THROTTLED):
                message = f"AppendRows: stream closed: {exc.message}"
                raise StreamClosed(message, acknowledged_rows) from exc
            raise
        if answered < len(payloads):
            raise TransientStoreError(
                f"AppendRows ended after {answered} of {len(payloads)} answers"
            )

    def _requests(
        self, stream: str, payloads: Sequence[Payload], offset: int
    ) -> Iterator[types.AppendRowsRequest]:
        for i, payload in enumerate(payloads):
            data = types.AppendRowsRequest.ArrowData(
                rows=types.ArrowRecordBatch(serialized_record_batch=payload.data)
            )
            if i == 0:  # the stream and schema go with a connection's first request only
                data.writer_schema = self._schema
            yield types.AppendRowsRequest(
                write_stream=stream if i == 0 else "", offset=offset, arrow_rows=data
            )
            offset += payload.rows

    def finalize(self, stream: str) -> int:
        """No more appends to `stream`; its row count."""
        response = self._client.finalize_write_stream(name=stream, timeout=_TIMEOUT_S)
        return int(response.row_count)

    def commit(self, streams: Sequence[str]) -> None:
        """Make finalised pending streams' rows visible, all or none (BatchCommitWriteStreams)."""
        response = self._client.batch_commit_write_streams(
            types.BatchCommitWriteStreamsRequest(parent=self._table, write_streams=list(streams)),
            timeout=_TIMEOUT_S,
        )
        if response.stream_errors:
            error = response.stream_errors[0]
            code = types.StorageError.StorageErrorCode(error.code).name
            raise PermanentStoreError(
                f"BatchCommitWriteStreams refused {error.entity}: {code}: {error.error_message}"
            )

    def committed(self, stream: str) -> bool:
        """Whether a pending stream's commit happened (its commit time is set)."""
        found = self._client.get_write_stream(name=stream, timeout=_TIMEOUT_S)
        return "commit_time" in found

    def close(self) -> None:
        self._client.transport.close()  # type: ignore[no-untyped-call]


def _check(response: types.AppendRowsResponse, payload: Payload, first_offset: int) -> None:
    """Return if the request's rows are in the stream, else raise what it means."""
    if "error" not in response or response.error.code == grpc.StatusCode.OK.value[0]:
        return
    code, message = response.error.code, response.error.message
    if code == grpc.StatusCode.ALREADY_EXISTS.value[0]:
        return  # these very rows, sent again at their offset after a lost answer
    if code == grpc.StatusCode.OUT_OF_RANGE.value[0]:
        raise OffsetOutOfRange(f"AppendRows from offset {first_offset}: {message}")
    if response.row_errors:
        first = response.row_errors[0]
        raise PermanentStoreError(
            f"BigQuery rejected {len(response.row_errors)} of {payload.rows} rows: "
            f"row {first.index}: {first.message}"
        )
    if _is_closed(message):
        raise StreamClosed(f"AppendRows: stream closed: {message}")
    raise api_errors.from_grpc_status(  # type: ignore[no-untyped-call]
        _status_code(code), f"AppendRows: {message}"
    )


def _is_closed(message: str) -> bool:
    return any(marker in message.lower() for marker in _CLOSED_MARKERS)


def _status_code(code: int) -> grpc.StatusCode:
    return next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)
