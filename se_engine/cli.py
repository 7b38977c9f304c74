"""``se-engine``: generate with any method, serve an OpenAI-compatible API, or run the demo (the README's main job)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .engine import Engine, GenerationResult
from .ensemble import EnsembleSpec
from .errors import SEEngineError
from .methods import METHODS
from .sampling import SamplingParams

# serve's arguments whose defaults are the server's
SERVE_DEFAULTS = ("max_body_bytes", "max_request_sequences", "max_queued_sequences", "shutdown_timeout")
DEMO_MODELS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
DEMO_PROMPT = "Write a Python function that checks whether a string is a palindrome."


def _ensemble(args) -> EnsembleSpec | None:
    if args.contrastive is not None:
        return EnsembleSpec.contrastive(args.contrastive)
    if args.weights is not None:
        return EnsembleSpec.weighted(args.weights)
    return None


def _params(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=tuple(args.stop or ()))


def _prompt(engine: Engine, text: str, chat: bool) -> str:
    if not chat:
        return text
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)


def _print_stream(engine: Engine, prompt: str, params: SamplingParams) -> GenerationResult:
    for out in engine.stream(prompt, params):
        print(out.text, end="", flush=True)
    print()
    return out.result


def _report(name: str, result: GenerationResult) -> None:
    m = result.metrics
    acc = ", ".join("-" if a is None else f"{a:.2f}" for a in m.acceptance_rate)
    print(f"[{name}] {m.tokens} tokens in {m.wall_s:.2f} s = {m.tokens_per_s:.2f} tok/s; forwards per model "
          f"{m.forwards}; acceptance per proposer [{acc}]", file=sys.stderr)


def _gamma(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a draft length is an int or 'auto', got {value!r}") from None


def _gammas(args) -> list[int] | str | None:
    return "auto" if args.gammas == ["auto"] else args.gammas


def _target(value: str) -> tuple[str, tuple[list[int], EnsembleSpec | None]]:
    """NAME=I,J[:weights:W1,W2 | :contrastive:ALPHA] -> (name, (model indices, spec or None))."""
    name, eq, rest = value.partition("=")
    members, _, spec = rest.partition(":")
    kind, _, numbers = spec.partition(":")
    try:
        indices = [int(i) for i in members.split(",")]
        if kind == "weights":
            return name, (indices, EnsembleSpec.weighted([float(w) for w in numbers.split(",")]))
        if kind == "contrastive":
            return name, (indices, EnsembleSpec.contrastive(float(numbers)))
    except ValueError:
        pass
    else:
        if eq and name and not spec:
            return name, (indices, None)
    raise argparse.ArgumentTypeError(f"a target is NAME=I,J[:weights:W1,W2 | :contrastive:ALPHA] (model indices "
                                     f"into --models), got {value!r}")


def _method(args) -> str:
    return args.method or ("ensemble_sd" if getattr(args, "target", None) else "se")


def cmd_generate(args) -> None:
    engine = Engine(args.models, _ensemble(args), _method(args), _gammas(args),
                    confidence_threshold=args.confidence_threshold, max_len=args.max_len)
    prompt = _prompt(engine, args.prompt, args.chat)
    _report(engine.method, _print_stream(engine, prompt, _params(args)))


def cmd_serve(args) -> None:
    try:
        from .server import serve
    except ImportError as e:  # the engine itself does not need the HTTP stack
        raise SEEngineError(f"se-engine serve needs {e.name}: pip install 'se_engine[server]'") from e
    engine = dict(models=args.models, ensemble=_ensemble(args), method=_method(args), gammas=_gammas(args),
                  confidence_threshold=args.confidence_threshold, max_batch=args.max_batch, max_len=args.max_len,
                  dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device,
                  targets=dict(args.target) if args.target else None, prefix_cache=not args.no_prefix_cache)
    given = {name: getattr(args, name) for name in SERVE_DEFAULTS if getattr(args, name) is not None}
    server = {"model_name": args.served_model_name, "api_key": args.api_key, "allowed_hosts": args.allowed_hosts,
              "docs": args.docs, **given}
    if args.ray:
        _serve_on_ray(args, engine, server)
    else:
        serve(Engine(**engine), args.host, args.port, log_level=args.log_level, **server)


def _serve_on_ray(args, engine: dict, server: dict) -> None:
    try:
        from .serve_ray import ReplicaConfig, run
    except ImportError as e:
        raise SEEngineError(f"se-engine serve --ray needs {e.name}: pip install 'se_engine[ray]'") from e
    try:
        autoscaling = json.loads(args.autoscaling) if args.autoscaling else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--autoscaling must be a JSON object, got {args.autoscaling!r}: {e}") from None
    shutdown_timeout = server.pop("shutdown_timeout", None)
    gpus = args.replica_gpus if args.replica_gpus is not None else float(args.device.startswith("cuda"))
    run(ReplicaConfig(engine, server, args.replicas, args.replica_cpus, gpus, autoscaling, shutdown_timeout),
        args.host, args.port)


def cmd_demo(args) -> None:
    """The default real pair, weighted 0.5 / 0.5, SE vs the standard ensemble on the same prompt."""
    spec = EnsembleSpec.weighted([0.5, 0.5])
    se = Engine(DEMO_MODELS, spec, "se", max_len=args.max_len)
    baseline = Engine(se.models, spec, "ensemble")
    prompt = _prompt(se, args.prompt, chat=True)
    params = _params(args)
    print(f"prompt: {args.prompt}\n--- speculative ensemble (se), {' + '.join(DEMO_MODELS)}, weights 0.5/0.5 ---")
    fast = _print_stream(se, prompt, params)
    _report("se", fast)
    slow = baseline.generate(prompt, params)[0]
    _report("ensemble", slow)
    same = "identical text" if fast.text == slow.text else "different samples of the same distribution"
    print(f"speed-up of se over the standard ensemble: {fast.metrics.tokens_per_s / slow.metrics.tokens_per_s:.2f}x "
          f"({same})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="se-engine", description="Fast, exact LLM ensembles (speculative ensemble).")
    sub = ap.add_subparsers(dest="command", required=True)

    def sampling_args(p, **defaults):
        p.add_argument("--temperature", type=float, default=defaults.get("temperature", 1.0))
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-new-tokens", type=int, default=defaults.get("max_new_tokens", 128))
        p.add_argument("--stop", action="append", help="stop string (repeatable)")
        p.add_argument("--max-len", type=int, default=2048, help="KV cache capacity per model")

    def engine_args(p):
        p.add_argument("--models", nargs="+", required=True, help="names, .gguf files or transformers directories")
        p.add_argument("--method", choices=METHODS, help="default: se (ensemble_sd with --target)")
        p.add_argument("--gammas", nargs="+", type=_gamma, help="draft length per model, in model order, or 'auto'")
        p.add_argument("--confidence-threshold", type=float, default=0.0,
                       help="end a proposal after a draft whose proposer's top probability is below this (0: never)")
        p.add_argument("--weights", type=float, nargs="+", help="weighted ensemble (normalised to sum 1)")
        p.add_argument("--contrastive", type=float, metavar="ALPHA", help="l_first - ALPHA * l_second")

    g = sub.add_parser("generate", help="generate text from a prompt")
    engine_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the models' chat template")
    g.add_argument("--prompt", required=True)
    sampling_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the server extra)")
    engine_args(s)
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded at once; more requests queue")
    s.add_argument("--max-len", type=int, default=2048, help="KV cache capacity per sequence (the context)")
    s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.add_argument("--no-prefix-cache", action="store_true",
                   help="empty a finished request's cache slot instead of keeping its prefix for later prompts")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model id clients send (default: the model names joined by +)")
    s.add_argument("--target", action="append", type=_target, metavar="NAME=I,J[:SPEC]",
                   help="serve several ensembles of --models (repeatable), each the model id NAME: the models at "
                        "indices I,J, with SPEC weights:W1,W2 or contrastive:ALPHA (default: equal weights); "
                        "one proposer drafts for all (method ensemble_sd)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's; info logs every request")
    # The defaults below are the server's (se_engine.server: imported only to serve).
    s.add_argument("--max-body-bytes", type=int, help="larger request bodies get a 413 (default: 4194304, 4 MiB)")
    s.add_argument("--max-request-sequences", type=int,
                   help="a request asking for more sequences (prompts x n) gets a 400 (default: 256)")
    s.add_argument("--max-queued-sequences", type=int,
                   help="sequences of all accepted requests, running or waiting; a request beyond gets a 429 "
                        "with Retry-After (default: 1024)")
    s.add_argument("--api-key", default=os.environ.get("SE_ENGINE_API_KEY") or None,
                   help="clients must send 'Authorization: Bearer KEY' (/health stays open); default: the "
                        "environment variable SE_ENGINE_API_KEY (which, unlike an argument, other users' ps "
                        "does not show), else no key")
    s.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                   help="answer only requests whose Host header names one of these (/health: any); default: any")
    s.add_argument("--docs", action="store_true", help="serve FastAPI's /docs, /redoc and /openapi.json")
    s.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                   help="on SIGINT / SIGTERM, how long requests in flight may take to finish before they are ended "
                        "(a stream with an error event and [DONE]); a second signal exits at once (default: 20.0)")
    r = s.add_argument_group("replicas on Ray Serve (the ray extra; se_engine.serve_ray)")
    r.add_argument("--ray", action="store_true", help="serve replicas of the engine behind Ray Serve's proxy at "
                                                       "--host:--port (the Ray cluster of RAY_ADDRESS, else a local one)")
    r.add_argument("--replicas", type=int, default=1, help="replicas, each one engine with these settings (default: 1)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica (default: 1)")
    r.add_argument("--replica-gpus", type=float, help="Ray GPUs per replica (default: 1 with --device cuda, else 0)")
    r.add_argument("--autoscaling", metavar="JSON", help="Ray Serve's autoscaling_config, e.g. "
                                                          "'{\"min_replicas\": 1, \"max_replicas\": 4}'")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="real Qwen2.5-Coder 0.5B + 1.5B: SE vs the standard ensemble")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    sampling_args(d, max_new_tokens=96)
    d.set_defaults(func=cmd_demo)

    args = ap.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, SEEngineError) as e:  # bad input: one clear line, no traceback
        ap.exit(2, f"se-engine: error: {e}\n")


if __name__ == "__main__":
    main()
