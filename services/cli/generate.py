"""`loraplex generate`: stream an answer from the router to the terminal as it is produced."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from loraplex.v1 import common_pb2
from services.cli.admin import UsageError
from services.client.inference import GenerateOptions, InferenceClient, PromptInput, Sampling
from services.common.config import ClientSettings, loraplex_home
from services.common.private_files import read_secret

# Where `loraplex dev` keeps the demo tenant's key (services.cli.dev writes it).
DEV_API_KEY_FILE = "dev-api-key"


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate", help="stream a completion through the router (LORAPLEX_API_KEY, else the dev key)"
    )
    p.add_argument("prompt")
    p.add_argument("--adapter", default="", help="name or name@version; omit for the bare base model")
    p.add_argument("--model", default="", help="base model (implied by the adapter when omitted)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("--system", default="", help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--request-id",
        default="",
        help="idempotency key: runs once per tenant within the idempotency window (then ALREADY_EXISTS)",
    )
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.set_defaults(fn=generate)


def dev_api_key(home: Path) -> str:
    """The key `loraplex dev` wrote to $LORAPLEX_HOME/dev-api-key, said once on stderr; else UsageError."""
    key_file = home / DEV_API_KEY_FILE
    if not key_file.is_file():
        raise UsageError(
            f"set LORAPLEX_API_KEY to an API key: 'loraplex keys create --tenant NAME' makes one, "
            f"and 'loraplex dev' writes one to {key_file} (none there now; is LORAPLEX_HOME right?)"
        )
    key = read_secret(key_file)
    print(f"using the dev API key in {key_file} (LORAPLEX_API_KEY is not set)", file=sys.stderr)
    return key


def generate(args: argparse.Namespace) -> int:
    settings = ClientSettings.from_env()
    api_key = settings.api_key or dev_api_key(loraplex_home())
    prompt: PromptInput = args.prompt
    if args.chat:
        turns = [("system", args.system)] if args.system else []
        prompt = [*turns, ("user", args.prompt)]
    options = GenerateOptions(
        adapter=args.adapter,
        model=args.model,
        request_id=args.request_id,
        sampling=Sampling(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
        ),
    )
    with InferenceClient(settings.router, api_key, ca=settings.router_ca) as client:
        for event in client.generate(prompt, options):
            kind = event.WhichOneof("event")
            if args.json:
                print(json.dumps(MessageToDict(event, preserving_proto_field_name=True)), flush=True)
            elif kind == "delta":
                sys.stdout.write(event.delta.text)
                sys.stdout.flush()
            elif kind == "finished":
                f = event.finished
                reason = common_pb2.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_").lower()
                print(
                    f"\n[{f.usage.input_tokens} in, {f.usage.output_tokens} out, {reason}, "
                    f"TTFT {f.timings.ttft_ms:.0f} ms{', cold start' if f.timings.cold_start else ''}]",
                    file=sys.stderr,
                )
    return 0
