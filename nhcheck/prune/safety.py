"""Prune's safety rule: which tensors the engine does not load may be left out, and why.

The rule (README, "What prune drops"): a tensor may go only when the engine would not load it
anyway *and* its absence cannot change the loaded model: a layer the model does not have, a
module the runtime does not build, a KV-cache scale where the runtime keeps no KV-cache scale, a
scale of a module whose weight loads unquantized. Everything else the engine drops, warns on or
raises on is unsafe, and an unsafe tensor makes the plan a refusal: what the engine raises on is
what prune removes, or refuses over.

What each replay branch means is the engine's to say (``Engine.unloaded_kind``,
``Engine.reads_kv_scales``): the branches and parameter names differ per engine; the rule here
speaks only the engine-neutral answers.
"""

from __future__ import annotations

from typing import NamedTuple

from nhcheck.audit import AuditReport, TensorRecord
from nhcheck.dtypes import FLOAT_CKPT, FLOAT_PARAM
from nhcheck.engines.base import Engine, Outcome

#: Checkpoint names of scale and auxiliary tensors (ModelOpt / compressed-tensors exports).
SCALE_SUFFIXES = ("input_scale", "weight_scale", "weight_scale_2", "k_scale", "v_scale", "kv_scale", "pre_quant_scale")
#: KV-cache scales, in the checkpoint's naming.
KV_SUFFIXES = ("k_scale", "v_scale", "kv_scale")


class Judgement(NamedTuple):
    """Whether one unloaded tensor may be dropped, and the sentence that says why (or why not)."""

    safe: bool
    why: str


def engine_action(outcome: Outcome, engine: Engine) -> str:
    """What the engine does with the tensor, as the first half of a reason."""
    label = engine.id.label
    if outcome.outcome == "raise":
        return f"{label} raises {outcome.message or 'on it'}"
    if outcome.outcome == "warn":
        return f"{label} warns and drops it"
    return f"{label} drops it silently"


class SafetyRule:
    """The rule applied to one audit: built once per report, asked once per unloaded tensor."""

    def __init__(self, report: AuditReport, engine: Engine) -> None:
        self.engine = engine
        self.manifest = report.manifest
        self.weights = {r.tensor.name: r for r in report.records if r.tensor.name.endswith(".weight")}
        self.kv_read = engine.reads_kv_scales(report.manifest)
        self._modules: frozenset[str] | None = None

    def runtime_modules(self) -> frozenset[str]:
        """Every dotted prefix of every runtime parameter name (built once, only when needed)."""
        if self._modules is None:
            mods: set[str] = set()
            for p in self.manifest.params:
                name = p.name
                i = name.rfind(".")
                while i > 0:
                    name = name[:i]
                    if name in mods:
                        break
                    mods.add(name)
                    i = name.rfind(".")
            self._modules = frozenset(mods)
        return self._modules

    def judge(self, record: TensorRecord) -> Judgement:
        """Apply the rule to one tensor the engine does not load (an orphan of the audit)."""
        t, outcome = record.tensor, record.outcome
        reason = outcome.reason
        kind = self.engine.unloaded_kind(reason)
        act = engine_action(outcome, self.engine)
        if kind == "past-model":
            return Judgement(True, f"{act}; safe: the model has no such layer, so nothing can read it")
        if kind == "elsewhere":
            return Judgement(
                False,
                f"the engine handles it outside the language-model loader ({reason}); "
                "nhcheck cannot say what it is for",
            )
        if self.manifest.lm_prefix and not t.name.startswith("language_model"):
            return Judgement(
                False, "the wrapper routes it outside the language model; nhcheck cannot say what it is for"
            )
        suffix = t.name.rpartition(".")[2]
        if suffix in KV_SUFFIXES:
            if kind == "kv-scale" and not self.kv_read:
                return Judgement(
                    True,
                    f"{act}; safe: the runtime KV cache is not quantized (no attn.k_scale/attn.v_scale "
                    "parameters), so no KV-cache scale is ever read",
                )
            return Judgement(
                False,
                "KV-cache scale the engine drops although the runtime keeps KV-cache scales: "
                "its name is wrong, not its presence",
            )
        engine_name = outcome.engine_name or ""
        module = self.manifest.lm_prefix + engine_name.rpartition(".")[0]
        if engine_name and module not in self.runtime_modules():
            return Judgement(True, f"{act}; safe: the runtime has no module {module}, so nothing can read it")
        if suffix not in SCALE_SUFFIXES:
            return Judgement(False, "not a scale or auxiliary tensor, and its module exists at runtime")
        wname = t.name[: -len(suffix)] + "weight"
        w = self.weights.get(wname)
        if w is None:
            return Judgement(False, "its module has no weight in the checkpoint to tell whether it is quantized")
        if w.outcome.outcome != "load" or w.param is None:
            return Judgement(False, f"its module's weight {wname} does not load either")
        p = self.manifest.by_name.get(w.param)
        if p is None:
            return Judgement(
                False, f"its module's weight loads into {w.param}, which nhcheck's manifest does not describe"
            )
        if p.dtype not in FLOAT_PARAM or w.tensor.dtype not in FLOAT_CKPT:
            return Judgement(
                False, f"load-bearing: the runtime keeps the module quantized ({p.name} is {p.dtype}), never dropped"
            )
        return Judgement(
            True,
            f"{act}; safe: its module's weight loads unquantized into {p.name} ({p.dtype}), which takes no {suffix}",
        )
