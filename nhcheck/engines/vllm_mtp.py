"""vLLM's MTP draft of a Nemotron-H checkpoint, replayed name by name (``oracle/vllm/EPOCHS.md``, "MTP draft").

``vllm serve --speculative-config '{"method": "mtp", ...}'`` turns a ``nemotron_h`` config with
``num_nextn_predict_layers > 0`` into ``NemotronHMTPModel`` (``config/speculative.py``
``hf_config_override``) and builds ``NemotronHMTP`` (``models/nemotron_h_mtp.py``, from 0.17.0) beside the
target. The whole checkpoint is streamed through ``NemotronHMTP.load_weights``, a hand-written loop that
keeps ``mtp.*`` names (and, by release, the embedding and the head), renames ``mtp.layers.`` to
``model.layers.``, maps stacked q/k/v and the experts, and skips every name it has no parameter for
without a word: the draft never raises on a name, only in a parameter's weight loader or in the strict
"weights not initialized" check of an unquantized draft. Its layers are the main model's
(``NemotronHAttentionDecoderLayer`` / ``NemotronHMoEDecoderLayer``), so the main row (``VLLMProfile``) still
decides parameter names, dtypes and loaders; ``MTPProfile`` holds what the draft's own file changes.

Every claim is checked against the goldens made with each release's own code
(``tests/conformance/mtp/*/expected-mtp-vllm-*.json.gz``, ``tests/test_conformance_vllm_mtp.py``).

This module must not import torch.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from nhcheck.engines.base import Outcome, Replayer, release_key
from nhcheck.engines.vllm import EXPERT_RE, EXPERT_SHARD, VLLMProfile, kv_remap
from nhcheck.errors import UsageError

LmHeadRule = Literal["substring", "prefix", "none"]


class MTPProfile(msgspec.Struct, frozen=True, kw_only=True):
    """What ``models/nemotron_h_mtp.py`` of one release does (``file:line`` of the release that introduced it).

    ``version`` is the release whose MTP goldens prove the row.
    """

    version: str
    #: The draft builds its own ``model.embed_tokens`` and ``lm_head`` (0.17.0 :233 / :344); 0.34.0 builds
    #: neither (the target's are shared after loading).
    own_embed_head: bool
    #: Which ``lm_head`` names pass the draft's filter: any name containing ``lm_head`` (0.17.0 :416), none
    #: (0.26.0 :418), names starting with ``lm_head.`` (0.30.0 :453).
    lm_head: LmHeadRule
    #: ``ParallelLMHead`` is built with the draft's quant config (0.30.0 :376); before, unquantized.
    lm_head_quantized: bool
    #: A draft that met no ``lm_head.*`` tensor reports its head as loaded (0.30.0 :553): the strict check
    #: does not ask for it.
    head_counted_without_tensor: bool
    #: ``load_weights`` strips a leading ``language_model.`` (0.29.0 :430).
    strips_language_model: bool
    #: Names with ``scale`` / ``zero_point`` go through ``maybe_remap_kv_scale_name`` first (0.30.0 :476): a
    #: KV-cache scale without a target is warned about and dropped.
    kv_scale_remap: bool
    #: The draft gets a quant config of its own (``get_draft_quant_config``, 0.30.0 :236) to which its own
    #: ``hf_to_vllm_mapper`` is applied; before, it shares the target's object, whose ``exclude_modules`` the
    #: target's mapper rewrote in place when the target was built (``configure_quant_config``).
    own_quant_config: bool
    #: The draft's ``hf_to_vllm_mapper`` (0.29.0 :321): ``language_model.`` stripped, and ``embeddings`` →
    #: ``embed_tokens`` (0.29.0 – 0.32.0); applied to the quant config's module names.
    quant_mapper: Literal["none", "strip+embeddings", "strip"]


#: M1: 0.17.0 – 0.25.x — own embedding and head; ``mtp.``, ``embeddings`` and ``lm_head`` names kept.
_M1 = MTPProfile(
    version="0.17.0",
    own_embed_head=True,
    lm_head="substring",
    lm_head_quantized=False,
    head_counted_without_tensor=False,
    strips_language_model=False,
    kv_scale_remap=False,
    own_quant_config=False,
    quant_mapper="none",
)
#: M2: 0.26.0 – 0.28.0 — ``lm_head`` names no longer kept (the draft's head is left as built).
_M2 = msgspec.structs.replace(_M1, version="0.26.0", lm_head="none")
#: M3: 0.29.0 — ``language_model.`` stripped; the draft's mapper rewrites the (shared) quant config.
_M3 = msgspec.structs.replace(_M2, version="0.29.0", strips_language_model=True, quant_mapper="strip+embeddings")
#: M4: 0.30.0 – 0.32.0 — own quant config, quantized head, ``lm_head.`` kept again, KV-scale remap.
_M4 = msgspec.structs.replace(
    _M3,
    version="0.30.0",
    lm_head="prefix",
    lm_head_quantized=True,
    head_counted_without_tensor=True,
    kv_scale_remap=True,
    own_quant_config=True,
)
#: M5: 0.33.0 – 0.34.0 — no embedding or head of its own; only ``mtp.`` names kept.
_M5 = msgspec.structs.replace(
    _M4,
    version="0.34.0",
    own_embed_head=False,
    lm_head="none",
    lm_head_quantized=False,
    head_counted_without_tensor=False,
    quant_mapper="strip",
)

#: Every release whose MTP draft nhcheck answers for → its row (each row's releases proven by goldens: see the
#: conformance tests).
MTP_PROFILES: dict[str, MTPProfile] = {
    **dict.fromkeys(
        ("0.17.0", "0.17.1", "0.18.0", "0.18.1", "0.19.0", "0.19.1", "0.20.0", "0.20.1", "0.20.2", "0.21.0"), _M1
    ),
    **dict.fromkeys(("0.22.0", "0.22.1", "0.23.0", "0.24.0", "0.25.0", "0.25.1"), _M1),
    **dict.fromkeys(("0.26.0", "0.27.0", "0.27.1", "0.28.0"), _M2),
    "0.29.0": _M3,
    **dict.fromkeys(("0.30.0", "0.31.0", "0.32.0"), _M4),
    **dict.fromkeys(("0.33.0", "0.34.0"), _M5),
}
#: The first release that ships ``models/nemotron_h_mtp.py``.
FIRST_MTP = "0.17.0"


def mtp_profile(release: str) -> MTPProfile:
    """The MTP row of ``release``: a usage error for a release without the draft or without goldens for it (a
    release newer than the table: the newest row, as the main model's)."""
    key = release_key(release, "vllm")
    if key < release_key(FIRST_MTP):
        raise UsageError(
            f"vllm {release} has no Nemotron-H MTP draft (models/nemotron_h_mtp.py first ships in {FIRST_MTP}): "
            "run without --mtp"
        )
    row = MTP_PROFILES.get(release)
    newest = max(MTP_PROFILES, key=release_key)
    if row is None and key > release_key(newest):
        return MTP_PROFILES[newest]
    if row is None:
        raise UsageError(
            f"vllm {release}'s MTP draft is not yet proven by golden data (no environment of it was run by the "
            f"oracle); nhcheck answers --mtp for vllm {', '.join(MTP_PROFILES)}"
        )
    return row


def draft_quant_name(name: str, mtp: MTPProfile) -> str:
    """A quant config module name as the draft's layers see it (``apply_vllm_mapper``).

    Before ``own_quant_config`` the target's mapper ran first on the shared object: ``backbone`` → ``model`` at
    the start, ``A_log`` / ``embeddings`` renamed; its ``"mtp": None`` (0.29.0) is left out of what it applies to
    a quant config (``WeightsMapper.get_rename_mapper``), so ``mtp*`` exclusions survive (goldens 0.29.0). Then
    the draft's own mapper, when it has one.
    """
    n = name
    if not mtp.own_quant_config:
        for old, new in (("A_log", "A"), ("embeddings", "embed_tokens")):
            n = n.replace(old, new, 1) if old in n else n
        if n.startswith("backbone"):
            n = "model" + n[len("backbone") :]
    if mtp.quant_mapper != "none":
        n = n.removeprefix("language_model.")
        if mtp.quant_mapper == "strip+embeddings" and "embeddings" in n:
            n = n.replace("embeddings", "embed_tokens", 1)
    return n


_STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"))


def make_mtp_replayer(params: frozenset[str], num_experts: int, main: VLLMProfile, mtp: MTPProfile) -> Replayer:
    """``NemotronHMTP.load_weights`` on one checkpoint name (``params``: the draft's ``named_parameters()``).

    The expert mapping is ``make_expert_params_mapping(up_proj, down_proj, "")``: the first
    ``experts.{e}.{up_proj|down_proj}.`` (e < E) the name contains decides; ids at or past E match nothing.
    """
    experts = "experts.routed_experts." if main.routed_experts else "experts."

    def replay(name: str) -> Outcome:
        n = name.removeprefix("language_model.") if mtp.strips_language_model else name
        keep = n.startswith("mtp.") or (mtp.own_embed_head and "embeddings" in n)
        if not keep and mtp.lm_head != "none":
            keep = "lm_head" in n if mtp.lm_head == "substring" else n.startswith("lm_head.")
        if not keep:
            return Outcome("skip", reason="mtp-filter")
        if "rotary_emb.inv_freq" in n:
            return Outcome("skip", engine_name=n, reason="rotary-skip")
        n = n.replace("mtp.layers.", "model.layers.")
        if mtp.own_embed_head and "embeddings" in n:
            n = n.replace("embeddings", "embed_tokens")
            if n.startswith("backbone."):
                n = n.replace("backbone.", "model.")
        if mtp.kv_scale_remap and ("scale" in n or "zero_point" in n):
            remapped, warning = kv_remap(n, params, main)
            if remapped is None:
                return Outcome("warn", engine_name=n, message=warning, reason="kv-drop")
            n = remapped
        stacked = False
        for param_name, weight_name, sid in _STACKED:
            if weight_name not in n or ".mixer." not in n:
                continue
            stacked = True
            target = n.replace(weight_name, param_name)
            if target in params:
                return Outcome("load", target, sid, engine_name=target)
        if stacked:
            return Outcome("skip", engine_name=n, reason="mtp-no-param")
        hits = sorted(
            (int(m.group(1)), EXPERT_SHARD[m.group(2)][2], m)
            for m in EXPERT_RE.finditer(n)
            if int(m.group(1)) < num_experts
        )
        if hits:
            e, _, m = hits[0]
            sid, prefix, _ = EXPERT_SHARD[m.group(2)]
            target = n.replace(m.group(0), experts + prefix)
            if target in params:
                return Outcome("load", target, sid, e, engine_name=target)
            return Outcome("skip", engine_name=target, reason="mtp-no-param")
        if n in params:
            return Outcome("load", n, engine_name=n)
        return Outcome("skip", engine_name=n, reason="mtp-no-param")

    return replay
