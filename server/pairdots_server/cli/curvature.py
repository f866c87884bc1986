"""`pairdots curvature`: EK-FAC and diagonal-Fisher factors of a bundle.

    pairdots curvature fit  --bundle DIR [--kind ekfac,diagonal] [--device cpu|cuda]
                            [--batch-size 32] [--seed 0] [--set-default ekfac] [--quiet]
    pairdots curvature show --bundle DIR

`fit` loads (and verifies) the bundle, fits every requested kind over the WHOLE training set
in memory, printing progress and timings, then adds the files (ekfac.safetensors,
diagonal.safetensors) and their records (manifest "curvature": {kind: {seconds, bytes, ...}})
in one crash-safe update: if anything fails, the bundle is left as it was and still verifies.
Restart the server (or reload the model) to serve the new factors.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def cmd_curvature_fit(args: argparse.Namespace) -> int:
    from pairdots_server.influence.artifacts import CurvatureConfig, add_curvature, parse_kinds
    from pairdots_server.influence.runtime import ModelRuntime
    from pairdots_server.influence.solver_policy import parse_method
    from pairdots_server.storage.bundle import load_bundle, verify_bundle

    kinds = parse_kinds(args.kind)
    default = None
    if args.set_default:
        choice = parse_method(args.set_default)
        if choice is None or (choice.value in ("ekfac", "diagonal")
                              and choice.value not in kinds and not _has(args.bundle, choice)):
            raise SystemExit(
                f"--set-default {args.set_default!r}: name a solver the bundle will have "
                f"(e.g. one of {','.join(kinds)})"
            )
        default = choice.value
    started = time.perf_counter()
    print(f"loading and verifying {args.bundle} (device {args.device})...", flush=True)
    rt = ModelRuntime(load_bundle(args.bundle, device=args.device))
    print(f"  {rt.name}: {rt.n_train} training examples, scope {rt.num_params:,} parameters "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    cfg = CurvatureConfig(batch_size=args.batch_size, seed=args.seed)
    manifest = add_curvature(args.bundle, rt, kinds, cfg, progress=not args.quiet,
                             default_solver=default)
    verify_bundle(args.bundle)
    for kind in kinds:
        info = manifest["curvature"][kind]
        print(f"{kind}: {info['file']} {info['bytes'] / 2**20:.2f} MiB, fitted in "
              f"{info['seconds']:.1f} s over {info['num_examples']} examples "
              f"(fisher {info['fisher']})")
    if default:
        print(f"default solver of {rt.name}: {default}")
    print(f"bundle updated and verified: {args.bundle} ({time.perf_counter() - started:.0f} s "
          "total); restart the server to serve the new factors")
    return 0


def _has(bundle: str, choice: Any) -> bool:
    from pairdots_server.influence.artifacts import CURVATURE_FILES
    from pairdots_server.storage.bundle import read_manifest

    return CURVATURE_FILES.get(choice.value, "") in read_manifest(bundle)["files"]


def cmd_curvature_show(args: argparse.Namespace) -> int:
    from pairdots_server.influence.artifacts import CURVATURE_FILES
    from pairdots_server.storage.bundle import verify_bundle

    m = verify_bundle(args.bundle)
    print(f"{m['name']}: verified")
    for kind, rel in CURVATURE_FILES.items():
        present = rel in m["files"]
        info = (m.get("curvature") or {}).get(kind)
        print(f"  {kind:9s} {'present' if present else 'missing':8s} {rel}"
              + (f"  {json.dumps(info, sort_keys=True)}" if present and info else ""))
    print(f"  defaults: {json.dumps(m.get('defaults') or {}, sort_keys=True)}")
    return 0


def add_curvature_parser(sub: Any, env: Any) -> None:
    c = sub.add_parser("curvature", help="fit EK-FAC / diagonal curvature factors of a bundle")
    csub = c.add_subparsers(dest="curvature_command", required=True)
    f = csub.add_parser("fit", help="fit factors over the whole training set and add them to "
                                    "an existing bundle (atomically)")
    f.add_argument("--bundle", required=True, help="bundle directory")
    f.add_argument("--kind", default="ekfac,diagonal",
                   help="comma-separated: ekfac, diagonal (default both)")
    f.add_argument("--device", default=env("DEVICE", "cpu"), help="cpu | cuda | cuda:N")
    f.add_argument("--batch-size", type=int, default=32, help="training examples per batch")
    f.add_argument("--seed", type=int, default=0, help="seed of the sampled Fisher labels")
    f.add_argument("--set-default", default=None, metavar="SOLVER",
                   help="also declare this solver the bundle's default (manifest "
                        "defaults.solver), e.g. ekfac")
    f.add_argument("--quiet", action="store_true", help="no progress lines")
    f.set_defaults(fn=cmd_curvature_fit)
    s = csub.add_parser("show", help="verify a bundle and list its curvature artifacts")
    s.add_argument("--bundle", required=True)
    s.set_defaults(fn=cmd_curvature_show)
