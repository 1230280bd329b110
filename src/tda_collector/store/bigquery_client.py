"""Connecting to BigQuery: an emulator anonymously, Google's service with its credentials."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import google.auth
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import bigquery

from ..config import BigQueryConfig
from ..errors import UsageError

_SCOPES = ("https://www.googleapis.com/auth/bigquery",)


def connect(config: BigQueryConfig, project: str, environ: Mapping[str, str]) -> bigquery.Client:
    """A client for `project`: anonymous against an emulator, else Application Default
    Credentials (the `GOOGLE_APPLICATION_CREDENTIALS` file, gcloud's login, or the metadata
    server). Missing credentials are a one-line UsageError."""
    if config.api_endpoint:
        return bigquery.Client(
            project=project,
            location=config.location,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=ClientOptions(api_endpoint=config.api_endpoint),
        )
    return bigquery.Client(
        project=project, location=config.location, credentials=credentials_for(environ)
    )


def credentials_for(environ: Mapping[str, str]) -> Credentials:
    """Application Default Credentials for BigQuery; missing ones are a one-line UsageError."""
    path = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path and not Path(path).is_file():
        raise UsageError(f"GOOGLE_APPLICATION_CREDENTIALS: no such file: {path}")
    try:
        credentials, _ = google.auth.default(scopes=_SCOPES)
    except DefaultCredentialsError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"storage.bigquery: no Google credentials ({reason}); "
            "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`"
        ) from None
    return credentials
