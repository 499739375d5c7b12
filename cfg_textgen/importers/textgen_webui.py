"""text-generation-webui (oobabooga) presets: flat YAML holding only what differs from its defaults.

Semantics (text-generation-webui modules/presets.py and sampler_hijack.py, early 2024):
- Missing keys take the web UI's defaults; the one that is not "off" is
  `repetition_penalty_range: 1024` (used when a preset sets a repetition penalty).
- Penalties (repetition/presence/frequency, no-repeat-ngram, DRY) are logits *processors* and run
  before every warper; the warpers run in `sampler_priority` (its default order unless the file
  gives one); `temperature_last` moves temperature (or dynamic temperature) to the end.
- With Mirostat on, the web UI drops every warper except temperature.
- Adaptive-P (`adaptive_target` above 0; `adaptive_decay` capped at 0.99) draws the token itself
  and masks every other one, so the warpers the order puts after it act on a single token: they
  are reported as not carried over.
- An API request's `sampler_priority` may name samplers the web UI does not know: it sorts them
  out of the way and runs the rest, so a request's unknown names are skipped (and listed in the
  report's `skipped`); a preset file's are errors.

The same engine reads SillyTavern's Text Completion presets (sillytavern.py), whose keys are these
under other names.
"""

from __future__ import annotations

import json

from ..settings import DRY_BREAKERS as DEFAULT_BREAKERS
from ._common import (Builder, fmt_num, grammar_key, repetition_penalty_entry, simple_sampler,
                      temperature_sampler, top_p_sampler)
from .steering import add_token_steering

DEFAULTS = {
    "temperature": 1, "temperature_last": False, "dynamic_temperature": False, "dynatemp_low": 1,
    "dynatemp_high": 1, "dynatemp_exponent": 1, "smoothing_factor": 0, "smoothing_curve": 1, "top_p": 1,
    "min_p": 0, "top_k": 0, "repetition_penalty": 1, "presence_penalty": 0, "frequency_penalty": 0,
    "repetition_penalty_range": 1024, "typical_p": 1, "tfs": 1, "top_a": 0, "epsilon_cutoff": 0,
    "eta_cutoff": 0, "guidance_scale": 1, "penalty_alpha": 0, "mirostat_mode": 0, "mirostat_tau": 5,
    "mirostat_eta": 0.1, "do_sample": True, "encoder_repetition_penalty": 1, "no_repeat_ngram_size": 0,
    "dry_multiplier": 0, "dry_base": 1.75, "dry_allowed_length": 2, "xtc_threshold": 0.1,
    "xtc_probability": 0, "top_n_sigma": 0, "adaptive_target": 0, "adaptive_decay": 0.9,
}

# processors: before every warper, in this order (unless sampler_priority places them)
PROCESSORS = ["repetition_penalty", "presence_penalty", "frequency_penalty", "dry", "no_repeat_ngram",
              "encoder_repetition_penalty"]
# the web UI's default warper order (Jan 2024), then the warpers added later
DEFAULT_PRIORITY = ["temperature", "dynamic_temperature", "quadratic_sampling", "top_k", "top_p", "typical_p",
                    "epsilon_cutoff", "eta_cutoff", "tfs", "top_a", "min_p", "mirostat"]
LATER_WARPERS = ["adaptive_p", "xtc", "top_n_sigma"]
KNOWN_SLOTS = set(PROCESSORS) | set(DEFAULT_PRIORITY) | set(LATER_WARPERS)
TEMPERATURE_SLOTS = {"temperature", "dynamic_temperature"}
LAST_SLOTS = ("temperature", "dynamic_temperature", "quadratic_sampling")  # temperature_last moves these, in order

OUR_SLOT = {"repetition_penalty": "repetition_penalty", "dynamic_temperature": "dynamic_temperature",
            "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "typical": "typical_p",
            "epsilon": "epsilon_cutoff", "eta": "eta_cutoff", "tfs": "tfs", "top_a": "top_a", "min_p": "min_p",
            "mirostat": "mirostat", "xtc": "xtc", "top_n_sigma": "top_n_sigma", "dry": "dry",
            "no_repeat_ngram": "no_repeat_ngram", "adaptive_p": "adaptive_p", "quadratic": "quadratic_sampling"}


def looks_like(data: dict) -> bool:
    extra_ok = {"sampler_priority", "negative_prompt", "dry_sequence_breakers", "seed", "num_beams",
                "length_penalty", "early_stopping", "min_length", "max_new_tokens"}
    return bool(data) and all(isinstance(k, str) for k in data) and set(data) <= set(DEFAULTS) | extra_ok


def import_yaml(data: dict, source: str, name: str | None, stem: str | None):
    b = Builder(source, "text-generation-webui preset", data)
    keys = {k: k for k in DEFAULTS} | {"sampler_priority": "sampler_priority", "negative_prompt": "negative_prompt",
                                       "dry_sequence_breakers": "dry_sequence_breakers"}
    ooba_chain(b, keys, DEFAULTS)
    missing = [k for k, v in DEFAULTS.items() if k not in data and k == "repetition_penalty_range"]
    if missing and b.samplers and b.samplers[0]["sampler"] == "repetition_penalty":
        b.note("repetition_penalty_range is not in the file: the web UI's default 1024 applies.")
    if "sampler_priority" not in data:
        b.note("sampler_priority is not in the file: the web UI's default order applies "
               "(penalties first, then " + ", ".join(DEFAULT_PRIORITY) + ").")
    max_new = b.num("max_new_tokens", integer=True)
    if max_new is not None:
        b.extra["max_new_tokens"] = max_new
        b.mapped("max_new_tokens", "max_new_tokens")
    preset = b.finish(name, stem, f"Imported from the text-generation-webui preset {source.rsplit('/', 1)[-1]}.")
    return preset, b.report


def _priority(b: Builder, key: str | None, lenient: bool = False) -> list[str]:
    if key is None or not b.has(key):
        return list(DEFAULT_PRIORITY)
    raw = b.data[key]
    if isinstance(raw, str):
        names = [line.strip() for line in raw.splitlines() if line.strip()]
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        names = list(raw)
    else:
        raise b.error(key, f"must be a list of sampler names (or one per line), got {raw!r}")
    aliases = {"tfs_z": "tfs", "typical": "typical_p", "dynatemp": "dynamic_temperature", "top_nsigma":
               "top_n_sigma", "temp": "temperature", "no_repeat_ngram_size": "no_repeat_ngram"}
    out = []
    for i, n in enumerate(names):
        n = aliases.get(n, n)
        if n not in KNOWN_SLOTS and lenient:
            b.report.skipped.append(names[i])
            b.note(f"{key}[{i}]: unknown sampler name {names[i]!r} skipped, as text-generation-webui does.")
            continue
        if n not in KNOWN_SLOTS:
            raise b.error(f"{key}[{i}]", f"unknown sampler name {names[i]!r}; known: {sorted(KNOWN_SLOTS)}")
        if n in out:
            raise b.error(f"{key}[{i}]", f"sampler {n!r} is listed twice")
        out.append(n)
    b.mapped(key, "sampler order")
    return out


def ooba_chain(b: Builder, keys: dict[str, str], defaults: dict, priority_key: str | None = "sampler_priority",
               lenient: bool = False):
    """Translate web-UI settings into b.samplers. `keys` maps the web UI's name to the source key;
    `lenient` (API requests) skips unknown `sampler_priority` names instead of refusing them."""
    src = {canon: key for canon, key in keys.items() if b.has(key)}

    def get(canon, integer=False):
        if canon in src:
            if isinstance(defaults.get(canon), bool):
                return b.boolean(src[canon])
            return b.num(src[canon], integer=integer)
        return defaults.get(canon)

    def rep(canon, status, detail):
        if canon in src:
            getattr(b, status)(src[canon], detail)

    slots: dict[str, list[dict]] = {}

    def fill(slot, before):
        added = b.samplers[before:]
        del b.samplers[before:]
        if added:
            slots.setdefault(slot, []).extend(added)

    # do_sample
    do_sample = get("do_sample")
    if do_sample is False:
        b.extra["do_sample"] = False
        rep("do_sample", "mapped", "do_sample")
    else:
        rep("do_sample", "neutral", "true: sampling (our default)")

    # temperature / dynamic temperature
    dynatemp = get("dynamic_temperature")
    n = len(b.samplers)
    if dynatemp:
        low, high, exp = get("dynatemp_low"), get("dynatemp_high"), get("dynatemp_exponent")
        b.add({"sampler": "dynamic_temperature", "low": low, "high": high, "exponent": exp})
        rep("dynamic_temperature", "mapped", "dynamic_temperature (replaces temperature)")
        for canon, param in (("dynatemp_low", "low"), ("dynatemp_high", "high"), ("dynatemp_exponent", "exponent")):
            rep(canon, "mapped", f"dynamic_temperature.{param}")
        rep("temperature", "dropped", "dynamic temperature replaces the fixed temperature")
        fill("dynamic_temperature", n)
    else:
        rep("dynamic_temperature", "neutral", "false: dynamic temperature off")
        for canon in ("dynatemp_low", "dynatemp_high", "dynatemp_exponent"):
            rep(canon, "neutral", "unused while dynamic temperature is off")
        if "temperature" in src:
            temperature_sampler(b, src["temperature"])
        elif defaults.get("temperature", 1) != 1:
            b.add({"sampler": "temperature", "temperature": defaults["temperature"]})
        fill("temperature", n)

    # quadratic sampling (the web UI runs it for a factor above 0)
    factor = get("smoothing_factor")
    n = len(b.samplers)
    if factor > 0:
        curve = get("smoothing_curve")
        b.add({"sampler": "quadratic", "factor": factor, "curve": DEFAULTS["smoothing_curve"] if curve is None else curve})
        rep("smoothing_factor", "mapped", "quadratic.factor")
        rep("smoothing_curve", "mapped", "quadratic.curve")
        fill("quadratic_sampling", n)
    else:
        rep("smoothing_factor", "neutral", "0 is off")
        rep("smoothing_curve", "neutral", "unused while smoothing_factor is 0")

    # single-parameter warpers
    for canon, slot, fn in (
        ("top_k", "top_k", lambda k: simple_sampler(b, k, "top_k", "k", 0, integer=True)),
        ("top_p", "top_p", lambda k: top_p_sampler(b, k)),
        ("typical_p", "typical_p", lambda k: top_p_sampler(b, k, "typical")),
        ("tfs", "tfs", lambda k: _tfs(b, k)),
        ("top_a", "top_a", lambda k: simple_sampler(b, k, "top_a", "a", 0)),
        ("min_p", "min_p", lambda k: simple_sampler(b, k, "min_p", "p", 0)),
        ("top_n_sigma", "top_n_sigma", lambda k: simple_sampler(b, k, "top_n_sigma", "n", 0)),
        ("epsilon_cutoff", "epsilon_cutoff", lambda k: _cutoff(b, k, "epsilon")),
        ("eta_cutoff", "eta_cutoff", lambda k: _cutoff(b, k, "eta")),
    ):
        n = len(b.samplers)
        if canon in src:
            fn(src[canon])
        fill(slot, n)

    # mirostat
    mode = get("mirostat_mode", integer=True)
    n = len(b.samplers)
    if mode in (1, 2):
        tau, eta = get("mirostat_tau"), get("mirostat_eta")
        b.add({"sampler": "mirostat", "version": mode, "tau": tau, "eta": eta})
        rep("mirostat_mode", "mapped", "mirostat.version")
        rep("mirostat_tau", "mapped", "mirostat.tau")
        rep("mirostat_eta", "mapped", "mirostat.eta")
    elif mode == 0:
        rep("mirostat_mode", "neutral", "0 is off")
        rep("mirostat_tau", "neutral", "unused while mirostat is off")
        rep("mirostat_eta", "neutral", "unused while mirostat is off")
    else:
        raise b.error(src["mirostat_mode"], f"must be 0, 1 or 2, got {mode!r}")
    fill("mirostat", n)

    # xtc
    prob, thr = get("xtc_probability"), get("xtc_threshold")
    n = len(b.samplers)
    if prob:
        b.add({"sampler": "xtc", "threshold": thr, "probability": prob})
        rep("xtc_probability", "mapped", "xtc.probability")
        rep("xtc_threshold", "mapped", "xtc.threshold")
    else:
        rep("xtc_probability", "neutral", "0 is off")
        rep("xtc_threshold", "neutral", "unused while xtc_probability is 0")
    fill("xtc", n)

    # adaptive-p: on for a target above 0 (the web UI's rule; llama.cpp's is "not negative")
    n = len(b.samplers)
    target, decay = get("adaptive_target"), get("adaptive_decay")
    if target > 0:
        b.add({"sampler": "adaptive_p", "target": min(target, 1.0), "decay": min(decay, 0.99)})
        rep("adaptive_target", "mapped", "adaptive_p.target" + (" (above 1: 1)" if target > 1 else ""))
        rep("adaptive_decay", "mapped", "adaptive_p.decay" + (" (the web UI caps it at 0.99)" if decay > 0.99 else ""))
    else:
        rep("adaptive_target", "neutral", "0 or less is off")
        rep("adaptive_decay", "neutral", "unused while adaptive_target is off")
    fill("adaptive_p", n)

    # penalties
    n = len(b.samplers)
    _penalties(b, get, rep, src)
    fill("repetition_penalty", n)
    n = len(b.samplers)
    _dry(b, get, rep, src)
    fill("dry", n)
    n = len(b.samplers)
    if "no_repeat_ngram_size" in src:
        simple_sampler(b, src["no_repeat_ngram_size"], "no_repeat_ngram", "size", 0, integer=True)
    fill("no_repeat_ngram", n)
    if get("encoder_repetition_penalty") == 1:
        rep("encoder_repetition_penalty", "neutral", "1 is off")
    else:
        rep("encoder_repetition_penalty", "dropped", "cfg-textgen has no encoder (prompt-only) repetition penalty")

    # guidance
    scale = get("guidance_scale")
    negative = b.string(src["negative_prompt"]) if "negative_prompt" in src else ""
    if scale is not None and scale != 1:
        b.cfg = {"scale": scale, "opposing_prompt": negative or ""}
        rep("guidance_scale", "mapped", "cfg.scale")
        rep("negative_prompt", "mapped" if negative else "neutral",
            "cfg.opposing_prompt" if negative else "empty: a blank story (our default)")
    else:
        rep("guidance_scale", "neutral", "1 is plain generation")
        rep("negative_prompt", "neutral" if not negative else "dropped",
            "empty" if not negative else "unused while guidance_scale is 1")

    # beam search, contrastive search and friends
    for canon, off, what in (("penalty_alpha", 0, "contrastive search is not supported"),
                             ("num_beams", 1, "beam search is not supported"),
                             ("length_penalty", 1, "only used by beam search, which is not supported"),
                             ("early_stopping", False, "only used by beam search, which is not supported"),
                             ("min_length", 0, "cfg-textgen has no minimum length"),
                             ("seed", -1, "seeds are given when generating, not in presets")):
        if canon in src:
            value = b.data[src[canon]]
            (b.neutral if value == off else b.dropped)(src[canon], f"{fmt_num(off) if not isinstance(off, bool) else 'false'} is off" if value == off else what)

    # order
    priority = _priority(b, priority_key, lenient)
    temperature_last = get("temperature_last")
    mirostat_on = "mirostat" in slots
    order = [p for p in PROCESSORS if p not in priority] + priority + [w for w in LATER_WARPERS if w not in priority]
    # a sampler the given order does not name sorts to the front in the web UI (its sort key is -1)
    order = [s for s in slots if s not in order] + order
    if temperature_last:
        order = [s for s in order if s not in LAST_SLOTS] + list(LAST_SLOTS)
        rep("temperature_last", "mapped", "sampler order: temperature moved to the end")
    else:
        rep("temperature_last", "neutral", "false: temperature stays where the order puts it")
    if mirostat_on:
        keep = set(PROCESSORS) | TEMPERATURE_SLOTS | {"mirostat"}
        _drop_slots(b, slots, src, [s for s in slots if s not in keep],
                    "the web UI turns this sampler off while Mirostat is on")
        # mirostat picks the token: it goes last, after temperature
        order = [s for s in order if s != "mirostat"] + ["mirostat"]
        b.note("Mirostat is on: as in text-generation-webui, only the penalties and temperature run before it.")
    elif "adaptive_p" in slots:
        after = order[order.index("adaptive_p") + 1:]
        _drop_slots(b, slots, src, [s for s in after if s in slots],
                    "runs after adaptive_p, which in the web UI leaves only the token it picked")
    samplers = [s for slot in order for s in slots.get(slot, [])]
    # top_p 0 becomes top_k 1; with a top_k 1 already in the chain it adds nothing
    b.samplers[:] = [s for i, s in enumerate(samplers) if s["sampler"] != "top_k" or s not in samplers[:i]]


def _slot_keys(slot: str) -> list[str]:
    return {"xtc": ["xtc_probability", "xtc_threshold"], "adaptive_p": ["adaptive_target", "adaptive_decay"],
            "quadratic_sampling": ["smoothing_factor", "smoothing_curve"],
            "dynamic_temperature": ["dynamic_temperature", "dynatemp_low", "dynatemp_high", "dynatemp_exponent"],
            }.get(slot, [slot])


def _drop_slots(b: Builder, slots: dict, src: dict, drop: list[str], why: str) -> None:
    """Take these slots' samplers out of the chain and report their keys as not carried over."""
    for slot in drop:
        del slots[slot]
        for canon in _slot_keys(slot):
            if canon in src and b.reported(src[canon]):
                b.report.entries.pop(b.k(src[canon]))
                b.dropped(src[canon], why)


def _tfs(b: Builder, key: str) -> None:
    value = b.num(key)
    if value >= 1:
        b.neutral(key, "tfs 1 is off")
    else:
        b.add({"sampler": "tfs", "z": value})
        b.mapped(key, "tfs.z")


def _cutoff(b: Builder, key: str, sampler: str) -> None:
    value = b.num(key)
    if value == 0:
        b.neutral(key, "0 is off")
        return
    b.add({"sampler": sampler, sampler: round(value * 1e-4, 12)})
    b.mapped(key, f"{sampler}.{sampler} (value x 1e-4)")


def _penalties(b: Builder, get, rep, src) -> None:
    penalty, pres, freq = get("repetition_penalty"), get("presence_penalty"), get("frequency_penalty")
    rng = get("repetition_penalty_range", integer=True)
    if penalty == 1 and not pres and not freq:
        rep("repetition_penalty", "neutral", "1 is off")
        rep("presence_penalty", "neutral", "0 is off")
        rep("frequency_penalty", "neutral", "0 is off")
        rep("repetition_penalty_range", "neutral", "no effect while the penalties are off")
        return
    b.add(repetition_penalty_entry(penalty, range=rng, presence=pres, frequency=freq))
    rep("repetition_penalty", "mapped" if penalty != 1 else "neutral",
        "repetition_penalty.penalty" if penalty != 1 else "1 is off")
    rep("presence_penalty", "mapped" if pres else "neutral", "repetition_penalty.presence" if pres else "0 is off")
    rep("frequency_penalty", "mapped" if freq else "neutral", "repetition_penalty.frequency" if freq else "0 is off")
    rep("repetition_penalty_range", "mapped" if rng else "neutral",
        "repetition_penalty.range" if rng else "0 means the whole context (our default)")


def _dry(b: Builder, get, rep, src) -> None:
    """DRY over the web UI's `repetition_penalty_range` (sampler_hijack.py passes
    `_range=generation_config.repetition_penalty_range`; the web UI has no DRY range of its own).
    `dry_penalty_last_n` (SillyTavern sends it to KoboldCpp / llama.cpp) is not read."""
    mult = get("dry_multiplier")
    keys = ("dry_base", "dry_allowed_length", "dry_sequence_breakers")
    if not mult:
        rep("dry_multiplier", "neutral", "0 is off")
        for canon in (*keys, "dry_penalty_last_n"):
            rep(canon, "neutral", "unused while dry_multiplier is 0")
        return
    sampler = {"sampler": "dry", "multiplier": mult, "base": get("dry_base"),
               "allowed_length": get("dry_allowed_length", integer=True)}
    rng = get("repetition_penalty_range", integer=True)
    if rng:  # 0 = the whole context, our default
        sampler["range"] = rng
    if "dry_sequence_breakers" in src and _breakers(b, src["dry_sequence_breakers"]) != DRY_BREAKERS:
        sampler["sequence_breakers"] = _breakers(b, src["dry_sequence_breakers"])
    b.add(sampler)
    rep("dry_multiplier", "mapped", "dry.multiplier")
    rep("dry_base", "mapped", "dry.base")
    rep("dry_allowed_length", "mapped", "dry.allowed_length")
    rep("dry_sequence_breakers", "mapped", "dry.sequence_breakers")
    if "repetition_penalty_range" in src:
        key = src["repetition_penalty_range"]
        before = b.report.entries.pop(b.k(key), None)
        also = "repetition_penalty.range and " if before is not None and before.status == "mapped" else ""
        if rng:
            b.mapped(key, f"{also}dry.range (the web UI gives DRY the repetition penalty's range)")
        elif before is not None and before.status == "mapped":
            b.report.entries[b.k(key)] = before
        else:
            b.neutral(key, "0 means the whole context, for DRY too (our default)")
    elif rng:
        b.note(f"repetition_penalty_range is not in the file: the web UI's default {rng} applies to DRY too.")
    if "dry_penalty_last_n" in src:
        off = b.data[src["dry_penalty_last_n"]] == 0
        rep("dry_penalty_last_n", "neutral" if off else "dropped",
            "0: the whole context" if off else "text-generation-webui gives DRY repetition_penalty_range "
            "and has no DRY range of its own (a KoboldCpp / llama.cpp setting)")


DRY_BREAKERS = list(DEFAULT_BREAKERS)  # the sampler's default, as the list a source file holds


def _breakers(b: Builder, key: str) -> list[str]:
    """A JSON list, or the web UI's comma-separated quoted strings ('"\\n", ":"')."""
    raw = b.data[key]
    if isinstance(raw, list):
        value = raw
    elif isinstance(raw, str):
        text = raw.strip()
        try:
            value = json.loads(text if text.startswith("[") else f"[{text}]")
        except (ValueError, RecursionError):
            raise b.error(key, f"must be a list of quoted strings, got {raw!r}") from None
    else:
        raise b.error(key, f"must be a list of strings, got {raw!r}")
    if not all(isinstance(x, str) for x in value):
        raise b.error(key, f"must be a list of strings, got {value!r}")
    return value


# ---- the web UI's HTTP API (server/webui.py): a request body is a preset in another envelope ----

PRESET_KEYS = set(DEFAULTS) | {"sampler_priority", "negative_prompt", "dry_sequence_breakers"}
# OpenAI's logit_bias, the web UI's custom_token_bans, TabbyAPI's banned_tokens (token ids) and
# banned_strings (phrases), the web UI's grammar_string and llama.cpp's grammar (what SillyTavern's
# llama.cpp type calls it)
STEERING_KEYS = {"logit_bias", "custom_token_bans", "banned_tokens", "banned_strings", "grammar_string", "grammar"}


def import_request(body: dict, source: str = "request", vocab_size: int | None = None):
    """The sampler fields of a text-generation-webui API request (`/v1/completions`) as our preset
    dict and its report, by the same `ooba_chain` that imports the web UI's preset files; its
    logit bias and token bans (steering.py) go first. Token ids are checked against `vocab_size`.

    Only keys a web UI preset holds are read; everything else in a request (the prompt, lengths,
    SillyTavern's own keys) is the caller's and is not reported. Bad values raise PresetError
    naming the key; unknown `sampler_priority` names are skipped (`report.skipped`), as the web UI
    runs the samplers it knows.
    """
    fields = {k: v for k, v in body.items() if k in PRESET_KEYS | STEERING_KEYS}
    b = Builder(source, "text-generation-webui API request", fields)
    ooba_chain(b, {k: k for k in PRESET_KEYS}, DEFAULTS, lenient=True)
    add_token_steering(b, bias_key="logit_bias", ban_keys=("custom_token_bans", "banned_tokens"), openai=True,
                       vocab_size=vocab_size, phrase_key="banned_strings")
    grammar_key(b, "grammar")
    grammar_key(b, "grammar_string")  # the web UI's name wins when both are sent
    return b.finish(None, "request", "A text-generation-webui API request."), b.report
