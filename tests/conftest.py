# isort: off
import fineinfer_jupyter.engine  # noqa: F401 (first: bitsandbytes then loads without Hub kernels, bnbguard.py)

# isort: on
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.models import load_model


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is (`make gpu-check`); elsewhere they show as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs these on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


PROMPTS = ["Hello there, tiny model.", "A", "The quick brown fox jumps over", "12345"]


def make_adapter(path, *, seed: int, r: int = 4, targets="all-linear"):
    """A saved LoRA adapter with non-zero random weights, so it changes the tiny model's output."""
    base = load_model("tiny").model
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets,
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_adapter(root / "alpha", seed=1),
        "beta": make_adapter(root / "beta", seed=2),
    }


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def stepped(data_dir):
    """An engine without a thread: the test calls step() itself."""
    engine = Engine(EngineConfig(model="tiny", data_dir=data_dir, policy="immediate"), thread=False)
    yield engine
    engine.shutdown()


@pytest.fixture
def engine(data_dir):
    engine = Engine(EngineConfig(model="tiny", data_dir=data_dir))
    yield engine
    engine.shutdown()


def run_until_done(engine, streams, max_steps=10_000):
    for _ in range(max_steps):
        if all(s.final is not None for s in streams):
            return
        engine.iterate()
    raise AssertionError("requests did not finish")


def hf_greedy(model, tokenizer, prompt, max_new_tokens, **kwargs):
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **kwargs,
    )
    return out[0, ids.shape[1] :].tolist()
