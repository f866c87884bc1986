"""Render the pairdots Helm chart offline, like `helm template`, without a helm binary.

Uses helm-python-sdk, which binds the real Helm v4 Go SDK (libhelm_c) through ctypes, so
the templates are rendered by Helm itself (same Go templates, Sprig functions, value
coalescing and `fail` messages); no cluster and no network are contacted.

    python deploy/render.py -f deploy/values-all-on.yaml --set replicaCount=1 > out.yaml

Dependencies (PyPI): helm-python-sdk, pyyaml.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CHART_DIR = Path(__file__).resolve().parent / "helm" / "pairdots"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``; nested mappings merge, the rest replaces."""
    merged: dict[str, Any] = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_values(files: Sequence[str | Path] = (), overrides: Sequence[Mapping[str, Any]] = ()
                ) -> dict[str, Any]:
    """User values: the files in order (later wins), then each override mapping."""
    import yaml

    values: dict[str, Any] = {}
    for name in files:
        loaded = yaml.safe_load(Path(name).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise TypeError(f"{name}: a values file must hold a mapping at the top level")
        values = deep_merge(values, loaded)
    for override in overrides:
        values = deep_merge(values, override)
    return values


def render_templates(values: Mapping[str, Any] | None = None, *, chart_dir: str | Path = CHART_DIR,
                     release: str = "pairdots", namespace: str = "pairdots",
                     ) -> dict[str, str]:
    """Render every template; returns ``{template path: rendered text}`` (NOTES.txt included).

    Raises helm_python.HelmRenderError when a template fails (e.g. a `fail` check).
    """
    import helm_python

    with helm_python.Chart.load(chart_dir) as chart:
        return chart.render(dict(values or {}), name=release, namespace=namespace,
                            is_install=True)


def render_manifests(values: Mapping[str, Any] | None = None, *,
                     chart_dir: str | Path = CHART_DIR, release: str = "pairdots",
                     namespace: str = "pairdots") -> list[dict[str, Any]]:
    """Render and parse: every Kubernetes object of the release, in template order."""
    import yaml

    objects: list[dict[str, Any]] = []
    rendered = render_templates(values, chart_dir=chart_dir, release=release,
                                namespace=namespace)
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt and helpers
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                objects.append(doc)
    return objects


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the rendered manifests as one multi-document YAML stream."""
    import helm_python
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--values", action="append", default=[],
                        help="values file (repeatable, later wins)")
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        help="helm --set expression (repeatable)")
    parser.add_argument("--release", default="pairdots")
    parser.add_argument("--namespace", default="pairdots")
    parser.add_argument("--chart", default=str(CHART_DIR))
    args = parser.parse_args(argv)
    overrides = [helm_python.parse_set_string(expr) for expr in args.sets]
    values = load_values(args.values, overrides)
    objects = render_manifests(values, chart_dir=args.chart, release=args.release,
                               namespace=args.namespace)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
