"""``bitstorm embeddings build | show | import`` (or ``python -m embeddings``): make, inspect
and import class-embedding files."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from bitstorm.atomic import write_json_atomic
from bitstorm.command import command_parser, run_command
from embeddings.build import build_embeddings
from embeddings.classes import CLASS_SETS, class_names
from embeddings.descriptions import Descriptions, clean_descriptions, load_descriptions
from embeddings.encoders import DEFAULT_ENCODER, load_encoder
from embeddings.llm import CLIENTS, CUPL_QUESTIONS, LLMConfig, load_questions
from embeddings.store import ClassEmbeddings, import_release, load_embeddings, save_embeddings


def build_parser(prog: str = "python -m embeddings") -> argparse.ArgumentParser:
    parser = command_parser(
        prog,
        "Make, inspect and import class-embedding files: class descriptions -> a text encoder "
        "-> one unit-norm embedding per class.",
        examples=(
            "bitstorm embeddings build --classes cifar10 --encoder ViT-B-32:openai "
            "--out c10.safetensors",
            "bitstorm embeddings show c10.safetensors",
            "bitstorm embeddings import gpt3.pth --classes imagenet --out in1k.safetensors",
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build a class-embedding file")
    build.add_argument(
        "--classes",
        required=True,
        help=f"class set ({', '.join(CLASS_SETS)}) or a text file, one name a line",
    )
    build.add_argument(
        "--descriptions",
        default="shipped",
        help="shipped (default), templates, llm, or a JSON file {class: [description, ...]}",
    )
    build.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help=f"open_clip ARCH:PRETRAINED or ARCH:/path/to/checkpoint, or "
        f"st:NAME_OR_PATH (default {DEFAULT_ENCODER})",
    )
    build.add_argument(
        "--random-encoder",
        action="store_true",
        help="use a randomly initialised open_clip tower (tests and demos only; "
        "recorded in the file)",
    )
    build.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    build.add_argument("--batch-size", type=int, default=256)
    build.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    build.add_argument(
        "--save-descriptions",
        type=Path,
        metavar="JSON",
        help="also write the cleaned descriptions that were encoded",
    )
    llm = build.add_argument_group("language model (--descriptions llm)")
    llm.add_argument(
        "--llm-base-url",
        help="OpenAI-compatible API root, e.g. "
        "http://localhost:8000/v1 (env BITSTORM_LLM_BASE_URL or OPENAI_BASE_URL)",
    )
    llm.add_argument("--llm-model", help="model name (env BITSTORM_LLM_MODEL)")
    llm.add_argument(
        "--llm-api-key", help="API key (better: env BITSTORM_LLM_API_KEY or OPENAI_API_KEY)"
    )
    llm.add_argument(
        "--llm-client",
        choices=CLIENTS,
        help="openai (the SDK: pip install 'bitstorm[openai]'), urllib (built in), or auto "
        "(default: openai where installed; env BITSTORM_LLM_CLIENT)",
    )
    llm.add_argument(
        "--questions",
        type=Path,
        help="question templates, one a line with {} "
        f"for the class (default: CuPL's {len(CUPL_QUESTIONS)})",
    )
    llm.add_argument("--answers-per-question", type=int)
    llm.add_argument("--requests-per-minute", type=float, help="rate limit (default 600)")
    llm.add_argument(
        "--concurrency", type=int, help="requests in flight at once, within the rate (default 8)"
    )
    llm.add_argument(
        "--llm-cache",
        type=Path,
        dest="cache_dir",
        help="answer cache folder (default ~/.cache/bitstorm/llm)",
    )

    show = commands.add_parser("show", help="print a file's metadata and class geometry")
    show.add_argument("file", type=Path)

    imp = commands.add_parser(
        "import",
        help="import a bare [C, D] tensor saved with torch.save (the paper's release format)",
    )
    imp.add_argument("file", type=Path)
    imp.add_argument("--classes", required=True, help="class set or file, in the tensor's order")
    imp.add_argument("--out", required=True, type=Path)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m embeddings") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_command(args, lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    if args.command == "build":
        result = _build(args)
        save_embeddings(result, args.out)
        print(
            f"wrote {args.out}: {result.num_classes} classes x {result.dim} dims, "
            f"encoder {result.encoder}, descriptions {result.description_source}"
        )
    elif args.command == "import":
        result = import_release(args.file, class_names(args.classes))
        save_embeddings(result, args.out)
        print(
            f"wrote {args.out}: {result.num_classes} classes x {result.dim} dims, "
            f"imported from {args.file}"
        )
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = load_embeddings(args.file)
        print(describe(result, args.file))
        for warning in caught:
            print(f"WARNING: {warning.message}")
    return 0


def _build(args: argparse.Namespace) -> ClassEmbeddings:
    names = class_names(args.classes)
    descriptions = clean_descriptions(_descriptions(args, names), names, args.descriptions)
    if args.save_descriptions:
        write_json_atomic(args.save_descriptions, descriptions)
    encoder = load_encoder(args.encoder, random_init=args.random_encoder, device=args.device)
    return build_embeddings(
        names,
        descriptions,
        encoder,
        description_source=args.descriptions,
        batch_size=args.batch_size,
    )


def _descriptions(args: argparse.Namespace, names: list[str]) -> Descriptions:
    llm_config, questions = None, None
    if args.descriptions == "llm":
        llm_config = LLMConfig.from_env(
            base_url=args.llm_base_url,
            model=args.llm_model,
            api_key=args.llm_api_key,
            answers_per_question=args.answers_per_question,
            requests_per_minute=args.requests_per_minute,
            concurrency=args.concurrency,
            cache_dir=args.cache_dir,
            client=args.llm_client,
        )
        questions = load_questions(args.questions) if args.questions else None
    return load_descriptions(
        args.descriptions, args.classes, names, llm_config=llm_config, questions=questions
    )


def describe(result: ClassEmbeddings, path: Path) -> str:
    """Metadata and a summary of pairwise cosine similarity between class embeddings."""
    lines = [f"{path}"]
    for key, value in result.metadata().items():
        if key == "class_names":
            names = list(result.class_names)
            value = json.dumps(names[:8] + (["..."] if len(names) > 8 else []))
        lines.append(f"  {key:<20} {value}")
    cosine = result.embeddings @ result.embeddings.T
    if result.num_classes > 1:
        off = ~torch.eye(result.num_classes, dtype=torch.bool)
        values = cosine[off]
        lines.append(
            f"  pairwise cosine      min {values.min():.3f}  mean {values.mean():.3f}  "
            f"max {values.max():.3f}"
        )
        upper = torch.triu(cosine, diagonal=1).masked_fill(~off.triu(1), -2.0)
        top = torch.topk(upper.flatten(), k=min(3, int(off.sum()) // 2))
        for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            i, j = divmod(flat, result.num_classes)
            lines.append(
                f"  closest pair         {result.class_names[i]} ~ "
                f"{result.class_names[j]}: {score:.3f}"
            )
    return "\n".join(lines)
