"""The embedded corpus: an offline, multi-domain TFDS dataset built from the Python install.

Three domains, each example labelled for per-domain routing analysis:
  code   .py files of the running interpreter's standard library (tests, site-packages,
         `encodings` tables and `pydoc_data` skipped; files over 64 KiB skipped);
  prose  the docstrings of each stdlib module (via `ast`) and the `pydoc_data.topics` help pages;
  math   arithmetic worksheets generated with a fixed seed: multi-digit +, -, *, division with
         remainder, bracketed expressions and short word problems, each with its answer.

Split: an example is in `validation` when a stable hash of its split key (the module path for
code and docstrings, so a module's code and its docstrings never straddle the split) falls in
the lowest 5%. Size: each domain takes examples in a fixed hash order until its byte budget
(`max_bytes_per_domain`, 95% train / 5% validation) is spent. The "default" config keeps 2 MiB
per domain, about 6.3M byte tokens: a ~10 minute tiny-model run on CPU (a few million
tokens) sees most of it about once, and per-domain validation sets of ~100 KB each.
The "large" config (6 MiB per domain) takes all the stdlib's prose there is (~2.1 MiB on Python
3.11), ~6 MiB of code and 6 MiB of math: ~14M byte tokens, so runs of up to ~13M training
tokens see no token twice (the `mini` scale of experiments/ trains on it). It depends on the
Python version only, like the default. The "tiny" config (32 KiB per domain) is for tests and
smoke runs.

The data is written as array_record, so building and reading need no TensorFlow. The Python
version and a SHA-256 of all examples are stored in `builder.info.metadata`; a copy built by a
different Python version (different stdlib) is reused with a warning.

Build explicitly and print statistics: `python -m moe_jax.data.corpus --data_dir=DIR`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import platform
import random
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import tensorflow_datasets as tfds
from absl import flags

from moe_jax.data.config import EMBEDDED_DOMAINS
from moe_jax.utils import cli

DOMAINS = EMBEDDED_DOMAINS
VALIDATION_PERCENT = 5
MAX_CODE_FILE_BYTES = 64 * 1024
MATH_SEED = 1234
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                 "encodings", "pydoc_data", "lib-dynload"}


class Document(NamedTuple):
    domain: str
    source: str  # unique id: module path, "pydoc_data.topics:<topic>" or "math/<index>"
    text: bytes


def _stable_hash(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")


def split_of(split_key: str) -> str:
    """'validation' for the 5% of keys with the lowest stable hash, else 'train'."""
    return "validation" if _stable_hash("split", split_key) % 100 < VALIDATION_PERCENT else "train"


def _stdlib_modules(stdlib: str) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted, skipping tests and third-party code."""
    paths = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("config-"))
        paths += [os.path.relpath(os.path.join(root, f), stdlib)
                  for f in files if f.endswith(".py")]
    return sorted(paths)


def _read_utf8(path: str) -> bytes | None:
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def _docstrings(source: bytes) -> bytes:
    """The module, class and function docstrings of `source`, separated by blank lines."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return b""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(d for d in docs if d).encode("utf-8")


# --- math domain -------------------------------------------------------------------------------

_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kemal",
          "Lena", "Mo", "Nia", "Omar", "Priya")
_ITEMS = ("apples", "marbles", "books", "stamps", "coins", "pencils", "shells", "cards")


def _number(rng: random.Random, max_digits: int) -> int:
    """A random integer with 1 to `max_digits` digits (uniform number of digits)."""
    digits = rng.randint(1, max_digits)
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _math_line(rng: random.Random) -> str:
    kind = rng.randrange(7)
    a, b = _number(rng, 6), _number(rng, 6)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        a, b = _number(rng, 4), _number(rng, 3)
        return f"{a} * {b} = {a * b}"
    if kind == 3:
        b = rng.randint(2, 99)
        return f"{a} / {b} = {a // b} remainder {a % b}"
    if kind == 4:
        a, b, c = _number(rng, 3), _number(rng, 3), rng.randint(2, 19)
        return f"({a} + {b}) * {c} = {(a + b) * c}"
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    x, y = rng.randint(2, 99), rng.randint(2, 40)
    if kind == 5:
        return (f"{name} has {x + y} {item} and gives {y} to {other}. "
                f"How many {item} does {name} have left? Answer: {x}")
    return (f"{name} packs {y} boxes with {x} {item} in each box. "
            f"How many {item} is that in total? Answer: {x * y}")


def _math_document(index: int) -> Document:
    rng = random.Random(f"moe_jax-math-{MATH_SEED}-{index}")  # str seeds are stable across Pythons
    lines = [_math_line(rng) for _ in range(rng.randint(20, 40))]
    return Document("math", f"math/{index:06d}", ("\n".join(lines) + "\n").encode("utf-8"))


# --- selection under a byte budget -------------------------------------------------------------


def _fill_budgets(
    keys: Iterable[str], load: Callable[[str], Document | None], max_bytes: int
) -> dict[str, list[Document]]:
    """Loads the documents of `keys` in order until each split's byte budget is spent.

    Budgets: 5% of `max_bytes` for validation, the rest for train; each split gets at least one
    document, and the last document taken may overshoot its budget (by < 64 KiB).
    """
    budget = {"validation": max_bytes * VALIDATION_PERCENT // 100}
    budget["train"] = max_bytes - budget["validation"]
    chosen: dict[str, list[Document]] = {"train": [], "validation": []}
    used = dict.fromkeys(chosen, 0)
    for key in keys:
        split = split_of(key)
        if used[split] >= budget[split]:
            if all(used[s] >= budget[s] for s in used):
                break
            continue
        doc = load(key)
        if doc is None or not doc.text:
            continue
        chosen[split].append(doc)
        used[split] += len(doc.text)
    return chosen


def _by_selection_hash(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: _stable_hash("select", k))


def collect_documents(max_bytes_per_domain: int, stdlib: str | None = None) -> dict[str, list]:
    """All documents of the corpus: {"train": [Document], "validation": [Document]}."""
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    modules = _stdlib_modules(stdlib)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}

    def code(path: str) -> Document | None:
        if os.path.getsize(os.path.join(stdlib, path)) > MAX_CODE_FILE_BYTES:
            return None
        text = _read_utf8(os.path.join(stdlib, path))
        return None if text is None else Document("code", path, text)

    def prose(key: str) -> Document | None:
        if key.startswith("pydoc_data.topics:"):
            return Document("prose", key, topics[key.split(":", 1)[1]].encode("utf-8"))
        text = _read_utf8(os.path.join(stdlib, key))
        return None if text is None else Document("prose", key, _docstrings(text))

    topic_keys = [f"pydoc_data.topics:{name}" for name in sorted(topics)]
    per_domain = (
        (_by_selection_hash(modules), code),
        (_by_selection_hash(modules + topic_keys), prose),
        ((f"math/{i:06d}" for i in range(10**7)), lambda key: _math_document(int(key[5:]))),
    )
    documents: dict[str, list[Document]] = {"train": [], "validation": []}
    for keys, load in per_domain:
        for split, docs in _fill_budgets(keys, load, max_bytes_per_domain).items():
            documents[split] += docs
    return documents


def content_sha256(documents: dict[str, list[Document]]) -> str:
    digest = hashlib.sha256()
    for split in sorted(documents):
        for doc in sorted(documents[split], key=lambda d: d.source):
            for part in (split, doc.domain, doc.source):
                digest.update(part.encode() + b"\0")
            digest.update(hashlib.sha256(doc.text).digest())
    return digest.hexdigest()


# --- the TFDS builder ------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
    max_bytes_per_domain: int = 2 * 1024 * 1024


# `python -m moe_jax.data.corpus` executes this file a second time as __main__; registering the
# builder name twice is an error, so only the package module registers it.
class MoeJaxCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """TFDS builder `moe_jax_corpus`: code / prose / math from the Python standard library."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS 4.9.10 locates a packaged builder's source folder (for download checksums) with the
    # `importlib_resources` backport that it does not declare as a dependency
    # (tensorflow/datasets#11212). This builder downloads nothing: it needs no source folder.
    code_path = None
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 (TFDS class attribute)
    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS class attribute)
        CorpusConfig(name="default", description="2 MiB per domain (~6 MiB)."),
        CorpusConfig(name="tiny", description="32 KiB per domain, for tests.",
                     max_bytes_per_domain=32 * 1024),
        CorpusConfig(name="large", description="6 MiB per domain where the stdlib has it "
                     "(~14 MiB: all the prose, most of the code).",
                     max_bytes_per_domain=6 * 1024 * 1024),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Offline multi-domain corpus built from the running Python installation: stdlib "
                "source (code), stdlib docstrings and pydoc topics (prose), and seeded "
                "arithmetic (math). metadata: python_version, content_sha256, stats."
            ),
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "domain": tfds.features.ClassLabel(names=DOMAINS),
                "source": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        documents = collect_documents(self.builder_config.max_bytes_per_domain)
        stats = {
            split: {d: {"examples": sum(doc.domain == d for doc in docs),
                        "bytes": sum(len(doc.text) for doc in docs if doc.domain == d)}
                    for d in DOMAINS}
            for split, docs in documents.items()
        }
        self.info.metadata.update(
            python_version=platform.python_version(),
            content_sha256=content_sha256(documents),
            max_bytes_per_domain=self.builder_config.max_bytes_per_domain,
            stats=stats,
        )
        return {split: self._generate_examples(docs) for split, docs in documents.items()}

    def _generate_examples(self, documents: list[Document]) -> Iterator[tuple[str, dict]]:
        for doc in documents:
            example = {"text": doc.text, "domain": doc.domain, "source": doc.source}
            yield f"{doc.domain}:{doc.source}", example


def corpus_builder(config_name: str = "default", data_dir: str | None = None) -> MoeJaxCorpus:
    """The (maybe unprepared) builder of `config_name` under `data_dir` (None: DataConfig's)."""
    from moe_jax.data.config import DataConfig

    data_dir = data_dir or DataConfig().resolved_data_dir()
    # array_record: written and read without TensorFlow, with random access for grain.
    return MoeJaxCorpus(config=config_name, data_dir=data_dir, file_format="array_record")


@contextlib.contextmanager
def _preparation_lock(data_dir: str, config_name: str) -> Iterator[None]:
    """Serializes the preparation of one corpus config by processes of this machine.

    Two runs started at once would both build the corpus and the second one's rename of its
    finished directory fails (tfds refuses to replace the first one's). Object-store data
    directories (`gs://...`) are prepared once beforehand; they are not locked here.
    """
    if "://" in data_dir:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".moe_jax_corpus_{config_name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_embedded_corpus(data_dir: str | None = None, config_name: str = "default"):
    """Builds the corpus under `data_dir` if it is not there yet; returns the prepared builder.

    Idempotent: an existing copy is reused (with a warning if another Python version built it).
    """
    from moe_jax.data.config import DataConfig

    data_dir = data_dir or DataConfig().resolved_data_dir()
    with _preparation_lock(data_dir, config_name):
        builder = corpus_builder(config_name, data_dir)
        builder.download_and_prepare()
    built_by = builder.info.metadata.get("python_version")
    if built_by != platform.python_version():
        warnings.warn(
            f"The embedded corpus in {builder.data_dir} was built by Python {built_by}, but this "
            f"is Python {platform.python_version()}: its stdlib text may differ from this "
            "interpreter's. Rebuild it with `python -m moe_jax.data.corpus --overwrite "
            f"--config={config_name} --data_dir={data_dir}` to match.",
            stacklevel=2,
        )
    return builder


def _print_stats(builder, seconds: float | None) -> None:
    meta = builder.info.metadata
    print(f"moe_jax_corpus/{builder.builder_config.name} at {builder.data_dir}")
    print(f"python {meta['python_version']}  content sha256 {meta['content_sha256']}")
    print(f"{'split':<11} {'domain':<6} {'examples':>9} {'bytes':>10}")
    for split, domains in meta["stats"].items():
        for domain, row in domains.items():
            print(f"{split:<11} {domain:<6} {row['examples']:>9} {row['bytes']:>10}")
    total = sum(row["bytes"] for d in meta["stats"].values() for row in d.values())
    print(f"total bytes {total}" + ("" if seconds is None else f"  build time {seconds:.1f} s"))


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: DataConfig's)",
                        flag_values=values)
    flags.DEFINE_enum("config", "default", ("default", "tiny", "large"), "the corpus size",
                      flag_values=values)
    flags.DEFINE_bool("overwrite", False, "delete and rebuild", flag_values=values)


def main(argv: list[str] | None = None) -> None:
    """Builds the embedded corpus (unless prepared) and prints its statistics."""
    args, _ = cli.parse_flags(define_flags, argv, "Build the embedded moe_jax corpus.")
    builder = corpus_builder(args.config, args.data_dir)
    seconds = None
    if args.overwrite or not builder.is_prepared():
        start = time.perf_counter()
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if args.overwrite:
            mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(download_mode=mode))
        seconds = time.perf_counter() - start
        builder = corpus_builder(args.config, args.data_dir)  # re-read the written info
    else:
        print("already prepared; pass --overwrite to rebuild")
    _print_stats(builder, seconds)


if __name__ == "__main__":
    # Run the package module's builder (registered under its importable name), not this copy.
    from moe_jax.data import corpus

    corpus.main()
