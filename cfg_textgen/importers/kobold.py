"""KoboldAI-family presets: KoboldAI presets as SillyTavern stores them (`temp`, `typical`,
`sampler_order`), KoboldAI United `.presets` bundles (a JSON array; each entry names itself with
`preset`) and KoboldCpp generation settings (its API's `temperature`, `max_length`, ...).

Semantics (KoboldAI United / KoboldCpp sampler order): `sampler_order` ids 0 top_k, 1 top_a,
2 top_p, 3 tfs, 4 typical, 5 temperature, 6 repetition penalty; samplers run in that order.
- An order without id 6 (older KoboldAI): the repetition penalty runs first (decision: KoboldAI
  applied it as a logits processor before the warpers, and id 6 was added at the front).
- KoboldCpp applies min_p together with top_p (id 2), right after it.
- Mirostat on: KoboldCpp ignores the order and runs repetition penalty, temperature, Mirostat.
- `rep_pen_slope` means two different things (docs/importing.md): KoboldAI United (its bundles
  and the KoboldAI presets SillyTavern ships) fades the penalty along a curve built over
  `rep_pen_range`, 0 = flat, only with a range (`modeling/warpers.py`); KoboldCpp / Kobold Lite
  give the older half of the window `1 + (rep_pen - 1) * slope`, 1 = flat, and read a slope
  outside (0, 1] as 1 (`gpttype_adapter.cpp` `sample_rep_pen`, `gpttype_generate`).
- `rep_pen_range`: KoboldAI United, 0 = the whole context; KoboldCpp, missing = 320 (its API
  default) and below 1 = 1 (it clamps `repeat_last_n`).
- XTC: KoboldCpp has no newline/EOS protection, so its XTC entry sets `protect_newline_eos` false.
- Adaptive-P (`adaptive_target`, `adaptive_decay`: the names SillyTavern sends to KoboldCpp) is
  llama.cpp's sampler, which draws the token and must come last: it runs after everything else,
  and a negative target (SillyTavern's default -0.01) is off.
- A generate request's `sampler_order` may hold ids KoboldCpp does not know: it prints "Unknown
  Sampler" and goes on (`gpttype_adapter.cpp`), so a request's unknown ids are skipped (listed in
  the report's `skipped`); a preset file's are errors.
"""

from __future__ import annotations

from ..errors import PresetError
from ._common import (Builder, fmt_num, grammar_key, repetition_penalty_entry, simple_sampler,
                      temperature_sampler, top_p_sampler)
from .steering import add_token_steering
from .textgen_webui import DRY_BREAKERS, _breakers

IDS = ["top_k", "top_a", "top_p", "tfs", "typical", "temperature", "repetition_penalty"]
DEFAULT_ORDER = [6, 0, 1, 3, 4, 2, 5]
VALUE_KEYS = {"top_k": ["top_k"], "top_a": ["top_a"], "top_p": ["top_p", "min_p"], "tfs": ["tfs"],
              "typical": ["typical"], "temperature": ["temp", "temperature", "dynatemp_range", "dynatemp_exponent",
                                                  "smoothing_factor", "smoothing_curve"],
              "repetition_penalty": ["rep_pen", "rep_pen_range", "rep_pen_slope", "presence_penalty"]}
OFF = {"top_k": 0, "top_a": 0, "top_p": 1, "min_p": 0, "tfs": 1, "typical": 1, "temp": 1, "temperature": 1,
       "dynatemp_range": 0, "rep_pen": 1, "presence_penalty": 0, "smoothing_factor": 0, "smoothing_curve": 1}
METADATA = {"uid", "Model Type", "Model Size", "Model Category", "Preset Category"}
UI_KEYS = {"streaming_kobold": "SillyTavern streaming toggle", "can_use_streaming": "SillyTavern streaming toggle",
           "trim_stop": "KoboldCpp output trimming", "sampler_seed": "seeds are given when generating",
           "max_context_length": "the context size is the loaded model's", "n": "one continuation at a time",
           "render_special": "detokenizer option", "bypass_eos": "ending at end-of-text is not a preset setting",
           "memory": "story memory is not part of a preset", "quiet": "KoboldCpp logging option"}


def looks_like(data: dict) -> bool:
    return ("sampler_order" in data and ("temp" in data or "temperature" in data or "rep_pen" in data)
            and "typical_p" not in data and "sampler_priority" not in data) or (
        "preset" in data and ("temp" in data or "rep_pen" in data))


def looks_like_bundle(data) -> bool:
    return isinstance(data, list) and bool(data) and all(isinstance(x, dict) for x in data)


def bundle_names(data: list) -> list[str]:
    return [str(e.get("preset", f"#{i}")) for i, e in enumerate(data)]


def pick(data: list, name: str, source: str) -> tuple[int, dict]:
    names = bundle_names(data)
    for exact in (True, False):
        for i, n in enumerate(names):
            if (n == name) if exact else (n.casefold() == name.casefold()):
                return i, data[i]
    raise PresetError(f"{source}: no preset named {name!r} in this bundle; it holds: {', '.join(names)}")


def import_preset(data: dict, source: str, name: str | None, stem: str | None, prefix: str = "",
                  fmt: str | None = None, lenient: bool = False, vocab_size: int | None = None):
    if fmt is None:
        fmt = "KoboldAI United preset" if "preset" in data else (
            "KoboldCpp settings" if "temperature" in data else "KoboldAI preset (SillyTavern)")
    b = Builder(source, fmt, data, prefix=prefix)
    koboldcpp = fmt == "KoboldCpp settings"
    temp_key = "temp" if "temp" in data else "temperature"
    if "temp" in data and "temperature" in data:
        b.dropped("temperature", "`temp` is present and takes precedence")
    order = _order(b, lenient)
    mirostat = b.num("mirostat", 0, integer=True)
    if mirostat not in (0, 1, 2):
        raise b.error("mirostat", f"must be 0, 1 or 2, got {mirostat!r}")
    if mirostat:
        applied = ["repetition_penalty", "temperature"]
        b.note("Mirostat is on: as in KoboldCpp, sampler_order is ignored and the chain is repetition "
               "penalty, temperature, Mirostat.")
    else:
        applied = [IDS[i] for i in order]
        if 6 not in order:
            applied.insert(0, "repetition_penalty")
            b.note("sampler_order has no repetition penalty (id 6): it runs first, as older KoboldAI did.")
    for sid in applied:
        _apply(b, sid, temp_key, koboldcpp)
    _dry_xtc(b, koboldcpp)
    _adaptive_p(b)
    if mirostat:
        tau, eta = b.num("mirostat_tau", 5.0), b.num("mirostat_eta", 0.1)
        b.add({"sampler": "mirostat", "version": mirostat, "tau": tau, "eta": eta})
        b.mapped("mirostat", "mirostat.version")
        b.mapped("mirostat_tau", "mirostat.tau")
        b.mapped("mirostat_eta", "mirostat.eta")
    else:
        b.neutral("mirostat", "0 is off")
        b.neutral("mirostat_tau", "unused while mirostat is off")
        b.neutral("mirostat_eta", "unused while mirostat is off")
    for sid, keys in VALUE_KEYS.items():
        for key in keys:
            if key in data and not b.reported(key):
                if key in OFF and data[key] == OFF[key]:
                    b.neutral(key, f"{fmt_num(OFF[key])} is off")
                else:
                    why = "Mirostat replaces the sampler order" if mirostat else "not in sampler_order"
                    b.dropped(key, f"{sid} is not applied ({why})")
    b.mapped("sampler_order", "sampler order")
    # KoboldCpp adds its biases before every sampler; custom_token_bans skips what is not an id
    add_token_steering(b, bias_key="logit_bias", ban_keys=("banned_tokens", "custom_token_bans"),
                       vocab_size=vocab_size, skip_bad=True, phrase_key="banned_strings",
                       phrase_key_if_no="banned_tokens")
    _other(b)
    preset_name = b.string("preset") or b.string("name")
    for key in ("preset", "name"):
        if key in data:
            b.mapped(key, "name") if not name else b.dropped(key, f"replaced by the name given: {name!r}")
    described = b.string("description")
    if described:
        b.mapped("description", "description")
    elif "description" in data:
        b.neutral("description", "empty")
    desc = described or f"Imported from the {fmt} {source.rsplit('/', 1)[-1]}" + (
        f" (entry {preset_name!r})." if prefix else ".")
    preset = b.finish(name, preset_name or stem, desc)
    return preset, b.report


def _order(b: Builder, lenient: bool = False) -> list[int]:
    raw = b.list_("sampler_order")
    if raw is None:
        b.note("No sampler_order: KoboldCpp's default [6, 0, 1, 3, 4, 2, 5] applies.")
        return list(DEFAULT_ORDER)
    out = []
    for i, x in enumerate(raw):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < len(IDS):
            if lenient:
                b.report.skipped.append(str(x))
                b.note(f"sampler_order[{i}]: unknown sampler id {x!r} skipped, as KoboldCpp does.")
                continue
            raise b.error(f"sampler_order[{i}]", f"unknown sampler id {x!r}; known: 0-6 ({', '.join(IDS)})")
        if x in out:
            raise b.error(f"sampler_order[{i}]", f"sampler id {x} is listed twice")
        out.append(x)
    return out


def _apply(b: Builder, sid: str, temp_key: str, koboldcpp: bool) -> None:
    if sid == "top_k":
        simple_sampler(b, "top_k", "top_k", "k", 0, integer=True)
    elif sid == "top_a":
        simple_sampler(b, "top_a", "top_a", "a", 0)
    elif sid == "top_p":
        top_p_sampler(b, "top_p")
        simple_sampler(b, "min_p", "min_p", "p", 0)
    elif sid == "tfs":
        value = b.num("tfs")
        if value is not None:
            if value >= 1:
                b.neutral("tfs", "tfs 1 is off")
            else:
                b.add({"sampler": "tfs", "z": value})
                b.mapped("tfs", "tfs.z")
    elif sid == "typical":
        top_p_sampler(b, "typical", "typical")
    elif sid == "temperature":
        spread = b.num("dynatemp_range", 0)
        if spread and spread > 0:
            t = b.num(temp_key, 1)
            exp = b.num("dynatemp_exponent", 1)
            b.add({"sampler": "dynamic_temperature", "low": max(0.0, t - spread), "high": t + spread,
                   "exponent": exp})
            b.mapped(temp_key, "dynamic_temperature.low/high (temperature -/+ dynatemp_range)")
            b.mapped("dynatemp_range", "dynamic_temperature.low/high")
            b.mapped("dynatemp_exponent", "dynamic_temperature.exponent")
        else:
            temperature_sampler(b, temp_key)
            b.neutral("dynatemp_range", "0 is off")
            b.neutral("dynatemp_exponent", "unused while dynatemp_range is 0")
        _smoothing(b, greedy=b.extra.get("do_sample") is False)
    elif sid == "repetition_penalty":
        _repetition_penalty(b, koboldcpp)


def _repetition_penalty(b: Builder, koboldcpp: bool) -> None:
    penalty = b.num("rep_pen", 1)
    rng = b.num("rep_pen_range", 320 if koboldcpp else 0, integer=True)
    slope = b.num("rep_pen_slope", 1 if koboldcpp else 0)
    pres = b.num("presence_penalty", 0)
    if penalty == 1 and not pres:
        b.neutral("rep_pen", "1 is off")
        for key in ("rep_pen_range", "rep_pen_slope", "presence_penalty"):
            b.neutral(key, "no effect while the repetition penalty is off")
        return
    entry = repetition_penalty_entry(penalty, presence=pres)
    b.add(entry)
    b.mapped("rep_pen", "repetition_penalty.penalty")
    b.mapped("presence_penalty", "repetition_penalty.presence") if pres else b.neutral(
        "presence_penalty", "0 is off")
    if koboldcpp:
        if rng < 1:
            entry["range"] = 1
            b.mapped("rep_pen_range", f"repetition_penalty.range = 1 (KoboldCpp reads {rng} as 1: the last token)")
        else:
            entry["range"] = rng
            b.mapped("rep_pen_range", "repetition_penalty.range") if b.has("rep_pen_range") else b.note(
                "rep_pen_range is not in the file: KoboldCpp's default 320 applies.")
        if 0 < slope < 1 and penalty > 1:
            entry.update(slope=slope, slope_mode="halves")
            b.mapped("rep_pen_slope", "repetition_penalty.slope with slope_mode halves (KoboldCpp: the "
                                      "older half of the window gets 1 + (rep_pen - 1) * slope)")
        elif 0 < slope <= 1:
            b.neutral("rep_pen_slope", "KoboldCpp's slope: 1 is flat" if slope == 1 else
                      "KoboldCpp fades only a penalty above 1: flat")
        else:
            b.neutral("rep_pen_slope", f"KoboldCpp reads a slope outside (0, 1] as 1: flat")
        return
    if rng:
        entry["range"] = rng
        b.mapped("rep_pen_range", "repetition_penalty.range")
    else:
        b.neutral("rep_pen_range", "0 means the whole context (our default)")
    if slope and rng:
        entry["slope"] = slope
        b.mapped("rep_pen_slope", "repetition_penalty.slope with slope_mode curve (KoboldAI United's "
                                  "curve over rep_pen_range, 0 = flat)")
    elif slope:
        b.neutral("rep_pen_slope", "KoboldAI United applies the slope only with a rep_pen_range: flat")
    else:
        b.neutral("rep_pen_slope", "0 is a flat penalty (KoboldAI United's curve)")


def _dry_xtc(b: Builder, koboldcpp: bool) -> None:
    mult = b.num("dry_multiplier", 0)
    dry_keys = ("dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers")
    if mult:
        sampler = {"sampler": "dry", "multiplier": mult, "base": b.num("dry_base", 1.75),
                   "allowed_length": b.num("dry_allowed_length", 2, integer=True)}
        if b.num("dry_penalty_last_n", 0, integer=True):
            sampler["range"] = b.num("dry_penalty_last_n", integer=True)
        if b.has("dry_sequence_breakers") and _breakers(b, "dry_sequence_breakers") != DRY_BREAKERS:
            sampler["sequence_breakers"] = _breakers(b, "dry_sequence_breakers")
        # DRY is a penalty: it runs with the repetition penalty, before the truncation samplers
        at = next((i + 1 for i, s in enumerate(b.samplers) if s["sampler"] == "repetition_penalty"), 0)
        b.samplers.insert(at, sampler)
        b.mapped("dry_multiplier", "dry.multiplier")
        for key in dry_keys:
            b.mapped(key, f"dry.{key.removeprefix('dry_').replace('penalty_last_n', 'range')}")
        b.note("DRY runs with the penalties, before the samplers in sampler_order (decision).")
    else:
        b.neutral("dry_multiplier", "0 is off")
        for key in dry_keys:
            b.neutral(key, "unused while dry_multiplier is 0")
    prob = b.num("xtc_probability", 0)
    if prob:
        xtc = {"sampler": "xtc", "threshold": b.num("xtc_threshold", 0.1), "probability": prob}
        if koboldcpp:
            xtc["protect_newline_eos"] = False
        b.add(xtc)
        b.mapped("xtc_probability", "xtc.probability (after the sampler order)" + (
            "; protect_newline_eos false: KoboldCpp's XTC may remove newline and EOS" if koboldcpp else ""))
        b.mapped("xtc_threshold", "xtc.threshold")
    else:
        b.neutral("xtc_probability", "0 is off")
        b.neutral("xtc_threshold", "unused while xtc_probability is 0")


def _smoothing(b: Builder, greedy: bool) -> None:
    """Quadratic sampling right after the temperature, as KoboldCpp's `sample_temperature` and
    `sample_entropy` apply it (off for a greedy temperature). KoboldCpp has no curve; a
    `smoothing_curve` sent with it (SillyTavern does) is the web UI's, 1 being KoboldCpp's rule."""
    factor = b.num("smoothing_factor", 0)
    if factor > 0 and not greedy:
        b.add({"sampler": "quadratic", "factor": factor, "curve": b.num("smoothing_curve", 1.0)})
        b.mapped("smoothing_factor", "quadratic.factor (after the temperature)")
        b.mapped("smoothing_curve", "quadratic.curve")
    else:
        b.neutral("smoothing_factor", "off" if factor <= 0 else "KoboldCpp turns smoothing off with greedy decoding")
        b.neutral("smoothing_curve", "unused while smoothing is off")


def _adaptive_p(b: Builder) -> None:
    target = b.num("adaptive_target", -1.0)
    if target >= 0:
        decay = b.num("adaptive_decay", 0.9)
        b.add({"sampler": "adaptive_p", "target": min(target, 1.0), "decay": min(max(decay, 0.0), 0.99)})
        b.mapped("adaptive_target", "adaptive_p.target, last (it draws the token)" + (" (above 1: 1)" if target > 1 else ""))
        b.mapped("adaptive_decay", "adaptive_p.decay (clamped to [0, 0.99], as llama.cpp does)")
    else:
        b.neutral("adaptive_target", "a negative target is off")
        b.neutral("adaptive_decay", "unused while adaptive_target is off")


def _other(b: Builder) -> None:
    genamt = b.num("genamt", integer=True)
    if genamt is not None:
        b.extra["max_new_tokens"] = genamt
        b.mapped("genamt", "max_new_tokens")
        b.dropped("max_length", "KoboldAI's max tokens of context; the context size is the loaded model's")
    else:
        length = b.num("max_length", integer=True)
        if length is not None:
            b.extra["max_new_tokens"] = length
            b.mapped("max_length", "max_new_tokens")
    stop = b.list_("stop_sequence")
    if stop is not None:
        if not all(isinstance(x, str) for x in stop):
            raise b.error("stop_sequence", f"must be a list of strings, got {stop!r}")
        if stop:
            b.extra["stop"] = stop
            b.mapped("stop_sequence", "stop")
        else:
            b.neutral("stop_sequence", "empty")
    grammar_key(b, "grammar")
    if "grammar_retain_state" in b.data:
        (b.neutral if b.data["grammar_retain_state"] is False else b.dropped)(
            "grammar_retain_state", "false: each generation starts the grammar afresh" if
            b.data["grammar_retain_state"] is False else "the grammar starts afresh with every generation")
    for key, off, why in (("use_default_badwordsids", False, "KoboldAI's default bad-words list is tokenizer-specific"),
                          ("nsigma", 0, "KoboldCpp's top-n-sigma placement is not documented; not guessed")):
        if key in b.data:
            (b.neutral if b.data[key] == off else b.dropped)(key, "off" if b.data[key] == off else why)
    for key, why in UI_KEYS.items():
        b.dropped(key, why)
    for key in METADATA:
        b.dropped(key, "KoboldAI preset metadata")


# ---- the KoboldAI API as KoboldCpp serves it (server/kobold.py) ----------------------------

# KoboldCpp's own defaults for a generate request's missing keys (koboldcpp.py `generate`), where
# they are not "off"; a request from Kobold Lite or SillyTavern sends every key anyway
API_DEFAULTS = {"temperature": 0.75, "top_k": 100, "top_p": 0.92, "rep_pen_range": 320,
                "dry_penalty_last_n": 320, "xtc_threshold": 0.2}
REQUEST_KEYS = {"temperature", "top_k", "top_a", "top_p", "min_p", "typical", "tfs", "dynatemp_range",
                "dynatemp_exponent", "rep_pen", "rep_pen_range", "rep_pen_slope", "presence_penalty",
                "sampler_order", "mirostat", "mirostat_tau", "mirostat_eta", "dry_multiplier", "dry_base",
                "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "xtc_threshold",
                "xtc_probability", "max_length", "stop_sequence", "smoothing_factor", "smoothing_curve", "nsigma",
                "adaptive_target", "adaptive_decay", "logit_bias", "banned_tokens", "banned_strings", "custom_token_bans",
                "grammar", "grammar_retain_state"}
CFG_KEYS = ("guidance_scale", "negative_prompt")  # our extension (SillyTavern sends them to KoboldCpp)


def import_request(body: dict, source: str = "request", vocab_size: int | None = None):
    """The sampler fields of a KoboldAI API generate request as our preset dict and its report, by
    the same `import_preset` that reads KoboldCpp settings files, with KoboldCpp's defaults for
    missing keys. `guidance_scale` / `negative_prompt` become the preset's CFG settings. Unknown
    `sampler_order` ids are skipped (`report.skipped`), as KoboldCpp skips them."""
    fields = dict(API_DEFAULTS) | {k: v for k, v in body.items() if k in REQUEST_KEYS}
    # KoboldCpp's meaning of every key (rep_pen_slope: KoboldCpp's halves, not KoboldAI's curve)
    preset, report = import_preset(fields, source, "request", None, fmt="KoboldCpp settings", lenient=True,
                                   vocab_size=vocab_size)
    b = Builder(source, "KoboldCpp API request", {k: body[k] for k in CFG_KEYS if k in body})
    scale = b.num("guidance_scale", 1.0)
    negative = b.string("negative_prompt", "")
    if scale != 1:
        preset["cfg"] = {"scale": scale, "opposing_prompt": negative}
        b.mapped("guidance_scale", "cfg.scale")
        b.mapped("negative_prompt", "cfg.opposing_prompt")
    for key, entry in b.report.entries.items():
        report.entries.setdefault(key, entry)
    return preset, report
