"""`python -m services.devtools adapters --out DIR`: train the SmolLM2 test adapters into DIR.
`python -m services.devtools tiny-model --out DIR`: write the tiny random Llama (a second base model
for `loraplex models import`; SmolLM2's tokenizer) and its test adapters (DIR-adapters/<name>).

A new user can register a real adapter without training one: each is a few PEFT optimizer steps
on fixed texts, deterministic and cached under $LORAPLEX_HOME/test-adapters.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from services.cli.progress import quiet_libraries, working
from services.common.base_models import pull_model
from services.common.config import DEFAULT_MODEL, loraplex_home
from services.devtools.adapters import SMOLLM2_TEST_ADAPTERS, build_adapter


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.devtools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("adapters", help=f"train the {DEFAULT_MODEL} test adapters")
    p.add_argument("--out", required=True, type=Path, help="directory to copy the adapters into")
    p = sub.add_parser("tiny-model", help="write the tiny random Llama the tests use, and its adapters")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    args = parser.parse_args(argv)
    quiet_libraries()
    home = loraplex_home()
    with working(f"pulling {DEFAULT_MODEL}"):
        model_dir = pull_model(DEFAULT_MODEL, home)
    if args.command == "tiny-model":
        from services.devtools.adapters import TINY_TEST_ADAPTERS
        from services.devtools.tiny_model import build_tiny_llama

        tiny = build_tiny_llama(args.out.resolve(), model_dir)
        print(f"tiny-llama   {tiny}")
        adapters = args.out.resolve().with_name(args.out.name + "-adapters")
        for spec in TINY_TEST_ADAPTERS:
            dest = build_adapter(tiny, spec, adapters / ".cache")
            link = adapters / spec.name
            if not link.exists():
                shutil.copytree(dest, link)
            print(f"{spec.name:12s} {link}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in SMOLLM2_TEST_ADAPTERS:
        with working(f"training {spec.name}"):
            built = build_adapter(model_dir, spec, home / "test-adapters")
        dest = args.out / spec.name
        if not dest.exists():
            shutil.copytree(built, dest)
        print(f"{spec.name:12s} {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
