// Parses LogQL and PromQL expressions with the grammars Grafana and Prometheus ship.
// stdin: JSON [{"lang": "logql" | "promql", "expr": "..."}]
// stdout: JSON [{"errors": [{"from": n, "to": n}], "metrics": ["name", ...]}] in the same order.
import { parser as logql } from "@grafana/lezer-logql";
import { parser as promql } from "@prometheus-io/lezer-promql";

const parsers = { logql, promql };

function inspect(lang, expr) {
  const errors = [];
  const metrics = new Set();
  const tree = parsers[lang].parse(expr);
  tree.iterate({
    enter(node) {
      if (node.type.isError) errors.push({ from: node.from, to: node.to });
      if (lang === "promql" && node.name === "VectorSelector") {
        const name = node.node.getChild("Identifier");
        if (name) metrics.add(expr.slice(name.from, name.to));
      }
    },
  });
  return { errors, metrics: [...metrics] };
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const items = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const results = items.map(({ lang, expr }) => {
  if (!(lang in parsers)) throw new Error(`unknown language ${lang}`);
  return inspect(lang, expr);
});
process.stdout.write(JSON.stringify(results));
