"""Shared helpers of the data-format tests: a tiny chat model, writers for every source kind,
and a hub data set cached offline in a temporary HF_HOME."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# only characters of the char tokenizer's alphabet (and its <bos>), so no <unk> hides a mistake
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}")


def chat_model(root: Path, seed: int = 3) -> Path:
    """The tiny Llama with the char tokenizer and ``TEMPLATE`` as its chat template."""
    from transformers import AutoTokenizer
    from alignspec.runtime.models.tiny import build_tiny_model
    d = build_tiny_model(root / "chat", "llama", seed=seed)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return d


def write_jsonl(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=2)
    return str(path)


def cache_hub_dataset(hf_home: Path, name: str, splits: dict, config: str = "default") -> None:
    """Put ``splits`` ({split: rows}) in ``hf_home``'s datasets cache as the hub data set ``name``
    (``owner/name``) with configuration ``config``, as ``datasets.load_dataset`` leaves it after a
    download, so that ``load_dataset(name, config, split=...)`` finds it offline."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet
    src = hf_home / "src" / name.replace("/", "__") / config
    files = {s: [write_parquet(src / f"{s}.parquet", rows)] for s, rows in splits.items()}
    owner, short = name.split("/")
    b = Parquet(cache_dir=str(hf_home / "build"), dataset_name=short, config_name=config,
                data_files=DataFilesDict.from_patterns(files), hash="0123abcd")
    b.download_and_prepare()
    built = Path(b.cache_dir)              # build/<name>/<config id>/<version>/<hash>: <name>-<split>.arrow
    dst = hf_home / "datasets" / f"{owner}___{short}" / config / built.parts[-2] / built.parts[-1]
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), str(dst))
    shutil.rmtree(hf_home / "build", ignore_errors=True)
