"""The layer walk: the runner's own pass over a decoder stack (docs/design.md, "The layer walk").

Embeddings, each decoder layer, the final norm and the head, called one by one as the model's
own forward calls them (masks, rotary positions, the KV cache and per-row adapters included),
so that a training micro-step can stop between two layers and go on later, and so that a layer
can be fetched just before it runs (offload.py) and serve an inference pass and a training
micro-step while it is there. The families in FAMILIES walk; other models fall back to their
own forward (`LayerWalk.why_not` says why).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .lean import BASE_ROW, LeanLayer, lean_layer, rows_of
from .precision import BASE_ONLY, mixed


@dataclass(frozen=True)
class Family:
    """What a family's stack forward does between its modules beyond Llama's (transformers'
    modeling_<family>.py). The rest lives inside the modules the walk calls: the embedding
    scale in embed_tokens (Gemma's ScaledWordEmbedding), extra norms, attention soft-capping,
    biases and q/k norms in the decoder layers; which layers slide comes from the config
    (`attention_types`)."""

    rotary_per_type: bool = False  # rotary_emb(hidden, positions, layer_type), one per type
    logit_softcap: bool = False  # logits = c * tanh(logits / c), c = final_logit_softcapping


# config.model_type -> Family: the decoder stacks the walk runs (embed_tokens, layers, norm,
# rotary_emb, lm_head)
FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "phi3": Family(),
    "gemma": Family(),
    "gemma2": Family(logit_softcap=True),
    "gemma3_text": Family(rotary_per_type=True, logit_softcap=True),
}


def attention_types(config) -> list[str]:
    """Each layer's attention type, as DynamicCache(config) makes its cache layers (transformers'
    cache_utils): config.layer_types, else every layer slides when config.sliding_window is set
    (Mistral, Phi-3)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    slides = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if slides else "full_attention"] * config.num_hidden_layers


@dataclass
class Pass:
    """The per-pass inputs every layer needs."""

    masks: dict  # attention type -> mask (4D, or None when causal attention needs none)
    position_embeddings: dict  # attention type -> rotary (cos, sin)
    position_ids: torch.Tensor  # [B, S]
    cache: object | None  # a DynamicCache to read and extend, or None (training)
    adapters: list[str] | None  # per-row adapter names for PEFT, None: the active adapter


class LayerWalk:
    def __init__(self, model):
        self.model = model  # the PeftModel, or the plain model before the first adapter
        self.why_not = unsupported(model)
        self.family = FAMILIES.get(self.stack.config.model_type) if self.why_not is None else None
        self.types = attention_types(self.stack.config) if self.why_not is None else []
        self.offload = None  # a LayerOffload when base layers live off the device
        self.lean = True  # decode passes run lean.py's layers (EngineConfig.lean_decode)

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, model) -> None:
        self._model = model
        self.forget()

    def forget(self) -> None:
        """Drop what rows() found in each module: before the model's structure changes (a
        PeftModel, an adapter's layers added or removed: AdapterStore calls it)."""
        self._lora: dict[int, list[torch.nn.Module]] = {}
        self._lean: dict[int, LeanLayer | None] = {}

    @property
    def supported(self) -> bool:
        return self.why_not is None

    @property
    def causal_lm(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "peft_config") else m

    @property
    def stack(self):
        return self.causal_lm.model

    @property
    def num_layers(self) -> int:
        return self.stack.config.num_hidden_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.stack.embed_tokens(input_ids)  # [B, S, H]

    def begin(
        self,
        hidden: torch.Tensor,
        *,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
        adapters: list[str | None] | None = None,
    ) -> Pass:
        """Masks and rotary embeddings for a pass whose input embeddings are `hidden`."""
        stack, config = self.stack, self.stack.config
        kwargs = dict(
            config=config,
            inputs_embeds=hidden,
            attention_mask=mask,
            cache=cache,
            position_ids=position_ids,
        )
        make = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        masks = {t: make[t](**kwargs) for t in set(self.types)}
        if self.family.rotary_per_type:
            rotary = {t: stack.rotary_emb(hidden, position_ids, t) for t in masks}
        else:
            rotary = dict.fromkeys(masks, stack.rotary_emb(hidden, position_ids=position_ids))
        rows = None
        if adapters is not None and hasattr(self.model, "peft_config"):
            rows = [a or BASE_ROW for a in adapters]
        return Pass(
            masks=masks,
            position_embeddings=rotary,
            position_ids=position_ids,
            cache=cache,
            adapters=rows,
        )

    def layers(
        self,
        p: Pass,
        hidden: torch.Tensor,
        start: int,
        end: int,
        *,
        kind: str = "train",
        also: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Decoder layers [start, end) on `hidden`, each fetched first if it is offloaded (for
        `kind` of work) and the next one prefetched; `also(i)` runs while layer i is still
        there (a training unit sharing the fetch)."""
        stack, off = self.stack, self.offload
        lean = kind == "decode" and self.lean and p.cache is not None
        lean = lean and not torch.is_grad_enabled()
        rows = rows_of(p.adapters) if lean else None
        for i in range(start, end):
            if off is not None and i + 1 < end:  # (none left in flight after the range)
                off.prefetch(i + 1)
            with self.resident(i, kind):
                mask = p.masks[self.types[i]]
                rotary = p.position_embeddings[self.types[i]]
                step = self.lean_layer(i) if lean else None
                if step is not None:
                    hidden = step.run(
                        hidden,
                        mask=mask,
                        position_embeddings=rotary,
                        cache=p.cache,
                        rows=rows,
                        position_ids=p.position_ids,
                        use_cache=True,
                    )
                else:
                    with self.rows(p, stack.layers[i]):
                        hidden = stack.layers[i](
                            hidden,
                            attention_mask=mask,
                            position_embeddings=rotary,
                            position_ids=p.position_ids,
                            cache=p.cache,
                            use_cache=p.cache is not None,
                        )
                if also is not None:
                    also(i)
        return hidden

    def lean_layer(self, i: int) -> LeanLayer | None:
        """Decoder layer i's lean decode (lean.py), None where it keeps the module call."""
        if i not in self._lean:
            self._lean[i] = lean_layer(self.stack.layers[i], self.stack.config)
        step = self._lean[i]
        return None if step is None or step.layer.training or step.hooked else step

    @property
    def lean_why_not(self) -> str | None:
        """Why decode passes call the decoder layers' modules (None: lean.py's layers run)."""
        if not self.supported:
            return self.why_not
        if not self.lean:
            return "lean_decode is off"
        kept = [i for i in range(self.num_layers) if self.lean_layer(i) is None]
        if kept:
            name = type(self.stack.layers[kept[0]]).__name__
            return f"{len(kept)} of {self.num_layers} decoder layers ({name}) keep the module call"
        return None

    def head(
        self, p: Pass, hidden: torch.Tensor, keep: int = 0, at: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final norm and LM head; `keep` > 0: logits of the last `keep` positions only; `at`
        (a [B, S] bool mask): of those positions only, as rows [N, V]."""
        hidden = self.stack.norm(hidden)
        if keep:
            hidden = hidden[:, -keep:]
        if at is not None:
            hidden = hidden[at]
        lm_head = self.causal_lm.lm_head
        with self.rows(p, lm_head):
            logits = lm_head(hidden)
        cap = getattr(self.stack.config, "final_logit_softcapping", None)
        if self.family.logit_softcap and cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def trainable(self, layer: int | None) -> list[torch.Tensor]:
        """The weights that train in decoder layer `layer`, or (None) outside every layer."""
        if layer is not None:
            return [p for p in self.stack.layers[layer].parameters() if p.requires_grad]
        inside = {id(p) for p in self.stack.layers.parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in inside]

    def resident(self, i: int, kind: str):
        """Layer i's weights on the device for the block."""
        return nullcontext() if self.offload is None else self.offload.resident(i, kind)

    def rows(self, p: Pass, module: torch.nn.Module):
        """Each row's adapter for the LoRA layers inside `module` (as the model's own forward
        does for `adapter_names`), only while it runs: a training unit that shares the layer
        in between uses the adapter it trains."""
        if p.adapters is None:
            return nullcontext()
        lora = self._lora.get(id(module))
        if lora is None:  # (a walk of the module's tree: a tenth of a small model's decode step)
            lora = [m for m in module.modules() if isinstance(m, LoraLayer)]
            self._lora[id(module)] = lora
        if not lora:
            return nullcontext()
        if all(a == BASE_ROW for a in p.adapters):
            # every row on the base: the LoRA layers call their base layer and nothing else,
            # in this thread only (PEFT's disabled-adapter path; its per-row one costs ~15 us
            # a layer: docs/design.md, "The layer walk")
            for m in lora:
                if m._disable_adapters is not BASE_ONLY:
                    m._disable_adapters = BASE_ONLY
            return BASE_ONLY.flipped()
        return _adapter_rows(lora, p.adapters)


@contextmanager
def _adapter_rows(layers: list[torch.nn.Module], rows: list[str]) -> Iterator[None]:
    """The hooks fire in the thread that registered them only: a training forward on the
    training worker (worker.py) runs the same modules meanwhile, on its job's adapter."""
    owner = threading.get_ident()

    def pre_hook(module, args, kwargs):
        if threading.get_ident() != owner:
            return None
        return args, {**kwargs, "adapter_names": rows}

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def unsupported(model) -> str | None:
    """Why the walk cannot run this model (None: it can)."""
    m = model.get_base_model() if hasattr(model, "peft_config") else model
    config = getattr(m, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model type {model_type!r} is not a decoder stack the walk knows ({', '.join(FAMILIES)})"
    if getattr(config, "use_bidirectional_attention", False):
        return "the model attends both ways (use_bidirectional_attention); the walk is causal only"
    if not set(attention_types(config)) <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(set(attention_types(config)))}: the walk knows full and sliding attention"
    stack = getattr(m, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if stack is None or not all(hasattr(stack, p) for p in parts) or not hasattr(m, "lm_head"):
        return "the model does not have the usual embed_tokens / layers / norm / lm_head parts"
    return None


class TrainingPass:
    """One micro-step as units that run a few at a time, with anything else in between: the
    forward of each layer, the head with the loss, then the backward of the head and of each
    layer in reverse. The input of every unit after the first is a leaf copy of the previous
    unit's output; the backward of a unit hands that leaf's gradient on to the unit before it.
    The gradients equal the whole micro-step's (the same operations, cut at the boundaries).
    Without a walk (other models), the micro-step is two units: forward, backward."""

    def __init__(
        self,
        walk: LayerWalk | None,
        model,
        batch: dict,
        *,
        scale: float,
        probe: bool = False,
        autocast: torch.dtype | None = None,
        own_grads: bool = False,
    ):
        self.walk, self.model, self.batch, self.scale = walk, model, batch, scale
        self.probe = probe  # calibration: the gradient w.r.t. the input embeddings only
        self.autocast = autocast  # a bf16 base's forwards compute in it (precision.mixed)
        self.lora = [m for m in model.modules() if isinstance(m, LoraLayer)] if autocast else []
        self.layers = walk.num_layers if walk is not None else 0
        self.units = 2 * (self.layers + 1)
        self.done = 0
        self.inputs: list[torch.Tensor | None] = []  # input of layer i (then of the head)
        self.outputs: list[torch.Tensor | None] = []  # output of layer i
        self.loss: torch.Tensor | None = None
        self.loss_sum: float | None = None
        self.labels = 0  # label tokens
        self.padded = 0  # tokens it computes (examples x the longest), set by its owner
        self.pass_: Pass | None = None
        # own_grads: the trainable weights' gradients stay here until add_grads(), so that two
        # micro-steps can run at once on two threads and still add up on .grad in their order
        # (docs/design.md, "The training worker"); None: backward adds them on .grad at once
        self.grads: dict[torch.Tensor, torch.Tensor] | None = (
            {} if own_grads and walk is not None else None
        )

    @property
    def finished(self) -> bool:
        return self.done == self.units

    @property
    def next_layer(self) -> int | None:
        """The layer whose forward the next unit runs (None: the head or a backward unit)."""
        return self.done if self.walk is not None and self.done < self.layers else None

    def run(self, n: int, *, sync=None, stop=None) -> list[float]:
        """Run up to n more units, fewer if `stop()`, asked after each unit, says so; returns
        each one's seconds of compute (fetching an offloaded layer's weights is counted apart,
        by the offload)."""
        off = self.walk.offload if self.walk is not None else None
        seconds = []
        while n > 0 and not self.finished:
            start = time.perf_counter()
            fetching = off.fetch_seconds if off is not None else 0.0
            self._unit(self.done)
            if sync is not None:
                sync()
            fetched = off.fetch_seconds - fetching if off is not None else 0.0
            seconds.append(time.perf_counter() - start - fetched)
            self.done += 1
            n -= 1
            if stop is not None and stop():
                break
        return seconds

    def _unit(self, u: int) -> None:
        forward = u <= self.layers
        if forward:
            device = self.batch["input_ids"].device
            with torch.enable_grad(), mixed(self.autocast, device, self.lora):
                self._forward(u)
        else:
            self._backward(self.units - 1 - u)  # head first (layers), then layers - 1 ... 0

    def _forward(self, u: int) -> None:
        ids, mask = self.batch["input_ids"], self.batch["attention_mask"]
        if self.walk is None:
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            self.loss = self._loss(out.logits)
            return
        if u == 0:
            hidden = self.walk.embed(ids)
            if self.probe:
                hidden = hidden.detach().requires_grad_()
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            with torch.no_grad():
                self.pass_ = self.walk.begin(hidden, mask=mask, position_ids=positions)
        else:
            hidden = self.outputs[u - 1].detach().requires_grad_()
        self.inputs.append(hidden)
        if u < self.layers:
            off = self.walk.offload
            with off.saved_tensors() if off is not None else nullcontext():
                self.outputs.append(self.walk.layers(self.pass_, hidden, u, u + 1))
        else:  # the head's logits only where a label is: the loss needs no others
            targets = next_tokens(self.batch["labels"])
            at = targets != -100
            logits = self.walk.head(self.pass_, hidden, at=at)
            self.loss, self.labels = token_loss(logits, targets[at])

    def _backward(self, layer: int) -> None:
        if layer == self.layers or self.walk is None:  # the head (or the whole model)
            loss = self.loss * self.scale
            if self.grads is None:
                loss.backward()
            else:
                self._gradients(loss, None, layer)
            self.loss_sum, self.loss = self.loss.item(), None
            return
        grad = self.inputs[layer + 1].grad
        with self.walk.resident(layer, "train"):  # fetched again, if it is offloaded
            if self.grads is None:
                self.outputs[layer].backward(grad)
            else:
                self._gradients(self.outputs[layer], grad, layer)
        self.inputs[layer + 1] = self.outputs[layer] = None

    def _gradients(self, output: torch.Tensor, grad: torch.Tensor | None, unit: int) -> None:
        """What backward would do for the unit (the head when unit == layers), without touching
        any weight's .grad: the input leaf's gradient on its .grad (the leaf is this pass's
        own), the trainable weights' in `grads`. A layer's weights are its own; those outside
        the layers (the head's, an embedding's adapter) are offered to the head and to layer 0,
        the two units whose graphs can reach them."""
        x = self.inputs[unit]
        weights = [] if unit == self.layers else self.walk.trainable(unit)
        if unit in (0, self.layers):
            weights = weights + self.walk.trainable(None)
        targets = ([x] if x.requires_grad else []) + weights
        if not targets or not output.requires_grad:
            return
        got = torch.autograd.grad(output, targets, grad, allow_unused=True)
        if x.requires_grad:
            x.grad, got = got[0], got[1:]
        for w, g in zip(weights, got, strict=True):
            if g is not None:
                self.grads[w] = g if w not in self.grads else self.grads[w] + g

    def add_grads(self) -> None:
        """Put the gradients kept in `grads` on the weights' .grad (added to what is there, as
        backward adds): the micro-steps of one effective batch in their order, one at a time."""
        for w, g in (self.grads or {}).items():
            if w.grad is None:
                w.grad = g
            else:
                w.grad += g
        if self.grads is not None:
            self.grads = {}

    def _loss(self, logits: torch.Tensor) -> torch.Tensor:
        loss, self.labels = token_loss(logits, self.batch["labels"])
        return loss


def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """What each position predicts: the next position's label (-100: nothing) [B, S]. The
    labels shift, not the (large) logits, so neither forward nor backward copies a slice."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The sum of the token losses of a batch, and its number of label tokens: logits [B, S, V]
    and the batch's labels [B, S], or logits [N, V] of the labelled positions and their
    targets [N] (TrainingPass: the head computes only those)."""
    logits = logits.float()  # no copy in fp32
    targets = next_tokens(labels) if labels.dim() == 2 else labels
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((targets != -100).sum())
