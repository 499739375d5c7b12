"""SillyTavern Text Completion presets (`temp`, `rep_pen`, `sampler_priority`, `guidance_scale`, ...).

One file serves many backends. We read it as text-generation-webui does (SillyTavern's names are
the web UI's settings renamed; `sampler_priority` is the web UI's order), so the semantics live in
textgen_webui.py. The other backends' order lists (`samplers` for llama.cpp, `sampler_order` for
KoboldCpp) and backend-only keys are reported as not carried over.
`epsilon_cutoff` and `eta_cutoff` are in units of 1e-4.
"""

from __future__ import annotations

import json

from ._common import Builder, grammar_key
from .steering import export_entries, sillytavern_steering
from .textgen_webui import DEFAULT_PRIORITY, DRY_BREAKERS, ooba_chain

# SillyTavern key -> text-generation-webui name
KEYS = {
    "temp": "temperature", "temperature_last": "temperature_last", "top_p": "top_p", "top_k": "top_k",
    "top_a": "top_a", "tfs": "tfs", "epsilon_cutoff": "epsilon_cutoff", "eta_cutoff": "eta_cutoff",
    "typical_p": "typical_p", "min_p": "min_p", "rep_pen": "repetition_penalty",
    "rep_pen_range": "repetition_penalty_range", "no_repeat_ngram_size": "no_repeat_ngram_size",
    "penalty_alpha": "penalty_alpha", "num_beams": "num_beams", "length_penalty": "length_penalty",
    "min_length": "min_length", "encoder_rep_pen": "encoder_repetition_penalty", "freq_pen": "frequency_penalty",
    "presence_pen": "presence_penalty", "do_sample": "do_sample", "early_stopping": "early_stopping",
    "dynatemp": "dynamic_temperature", "min_temp": "dynatemp_low", "max_temp": "dynatemp_high",
    "dynatemp_exponent": "dynatemp_exponent", "smoothing_factor": "smoothing_factor",
    "smoothing_curve": "smoothing_curve", "dry_allowed_length": "dry_allowed_length",
    "dry_multiplier": "dry_multiplier", "dry_base": "dry_base", "dry_sequence_breakers": "dry_sequence_breakers",
    "dry_penalty_last_n": "dry_penalty_last_n", "mirostat_mode": "mirostat_mode", "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta", "guidance_scale": "guidance_scale", "negative_prompt": "negative_prompt",
    "sampler_priority": "sampler_priority", "xtc_threshold": "xtc_threshold", "xtc_probability": "xtc_probability",
    "nsigma": "top_n_sigma", "seed": "seed", "adaptive_target": "adaptive_target",
    "adaptive_decay": "adaptive_decay",
}
# neutral defaults when a key is absent (SillyTavern files normally carry every key)
DEFAULTS = {
    "temperature": 1, "temperature_last": False, "dynamic_temperature": False, "dynatemp_low": 1,
    "dynatemp_high": 1, "dynatemp_exponent": 1, "smoothing_factor": 0, "repetition_penalty": 1,
    "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty_range": 0, "mirostat_mode": 0,
    "mirostat_tau": 5, "mirostat_eta": 0.1, "do_sample": True, "encoder_repetition_penalty": 1,
    "dry_multiplier": 0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 0,
    "xtc_threshold": 0.1, "xtc_probability": 0, "guidance_scale": 1, "adaptive_target": -0.01,
    "adaptive_decay": 0.9,
}

# SillyTavern/back-end keys with no sampling meaning here: key -> (value that means off, reason)
BACKEND_KEYS = {
    "add_bos_token": (True, "tokenizer option; the model's own BOS handling is used"),
    "ban_eos_token": (False, "banning the end-of-text token is not a preset setting here"),
    "ignore_eos_token": (False, "ignoring the end-of-text token is not a preset setting here"),
    "skip_special_tokens": (True, "detokenizer option; special tokens are skipped"),
    "spaces_between_special_tokens": (True, "detokenizer option"),
    "speculative_ngram": (False, "speculative decoding option; no effect on the distribution"),
    "json_schema": ({}, "JSON schemas are not supported"),
    "rep_pen_decay": (0, "repetition-penalty decay is a KoboldCpp/TabbyAPI setting with no equivalent"),
    "rep_pen_size": (0, "a backend-specific setting with no equivalent"),
    "skew": (0, "skew is an Aphrodite/TabbyAPI setting with no equivalent"),
    "streaming": (None, "streaming is a transport option"),
}


def looks_like(data: dict) -> bool:
    return "temp" in data and ("sampler_priority" in data or "typical_p" in data or "rep_pen_decay" in data
                               or "guidance_scale" in data)


def import_preset(data: dict, source: str, name: str | None, stem: str | None):
    b = Builder(source, "SillyTavern Text Completion preset", data)
    ooba_chain(b, {canon: st for st, canon in KEYS.items()}, DEFAULTS)
    penalty_on = any(s["sampler"] == "repetition_penalty" for s in b.samplers)
    slope = b.num("rep_pen_slope")
    if slope is not None:
        if not penalty_on:
            b.neutral("rep_pen_slope", "no effect while the repetition penalty is off")
        elif slope == 1:
            b.neutral("rep_pen_slope", "1 is flat in KoboldCpp, the backend that reads it (the web UI has none)")
        else:
            b.dropped("rep_pen_slope", "text-generation-webui, whose semantics this importer follows, has no "
                      "slope (KoboldCpp's setting)")
    if "samplers" in data:
        b.dropped("samplers", "order for the llama.cpp backend; this importer follows sampler_priority")
    if "sampler_order" in data:
        b.dropped("sampler_order", "order for the KoboldCpp backend; this importer follows sampler_priority")
    sillytavern_steering(b)  # banned_tokens, logit_bias
    grammar_key(b, "grammar_string")
    for key, (off, reason) in BACKEND_KEYS.items():
        if key in data:
            (b.neutral if data[key] == off else b.dropped)(key, "the default: no effect" if data[key] == off else reason)
    if "genamt" in data:
        value = b.num("genamt", integer=True)
        b.extra["max_new_tokens"] = value
        b.mapped("genamt", "max_new_tokens")
    if "sampler_priority" not in data:
        b.note("No sampler_priority: text-generation-webui's default order applies (penalties first, then "
               + ", ".join(DEFAULT_PRIORITY) + ").")
    b.note("Read with text-generation-webui semantics (SillyTavern's main Text Completion backend): "
           "penalties run before the samplers in sampler_priority.")
    preset = b.finish(name, stem, f"Imported from the SillyTavern Text Completion preset {source.rsplit('/', 1)[-1]}.")
    return preset, b.report


# ---- export -----------------------------------------------------------------------------------

_PRIORITY_NAME = {"temperature": "temperature", "dynamic_temperature": "dynamic_temperature", "top_k": "top_k",
                  "top_p": "top_p", "typical": "typical_p", "epsilon": "epsilon_cutoff", "eta": "eta_cutoff",
                  "tfs": "tfs", "top_a": "top_a", "min_p": "min_p", "mirostat": "mirostat",
                  "quadratic": "quadratic_sampling"}
_PROCESSORS = ("repetition_penalty", "dry", "no_repeat_ngram")


def export(preset: dict, report) -> dict:
    """Our preset dict -> a SillyTavern Text Completion preset (text-generation-webui semantics)."""
    out = {
        "temp": 1, "temperature_last": False, "top_p": 1, "top_k": 0, "top_a": 0, "tfs": 1, "epsilon_cutoff": 0,
        "eta_cutoff": 0, "typical_p": 1, "min_p": 0, "rep_pen": 1, "rep_pen_range": 0, "rep_pen_slope": 0,
        "no_repeat_ngram_size": 0, "penalty_alpha": 0, "num_beams": 1, "length_penalty": 1, "min_length": 0,
        "encoder_rep_pen": 1, "freq_pen": 0, "presence_pen": 0, "do_sample": preset.get("do_sample", True),
        "early_stopping": False, "dynatemp": False, "min_temp": 1, "max_temp": 1, "dynatemp_exponent": 1,
        "smoothing_factor": 0, "smoothing_curve": 1, "dry_allowed_length": 2, "dry_multiplier": 0,
        "dry_base": 1.75, "dry_sequence_breakers": json.dumps(DRY_BREAKERS), "dry_penalty_last_n": 0,
        "mirostat_mode": 0, "mirostat_tau": 5, "mirostat_eta": 0.1, "guidance_scale": 1, "negative_prompt": "",
        "xtc_threshold": 0.1, "xtc_probability": 0, "adaptive_target": -0.01, "adaptive_decay": 0.9,
    }
    samplers = preset.get("samplers", [])
    priority: list[str] = []
    seen: set[str] = set()
    processors_done = True  # processors must come before every warper to survive the round trip
    mirostat = any(s["sampler"] == "mirostat" for s in samplers)
    for i, s in enumerate(samplers):
        key, name = f"samplers[{i}]", s["sampler"]
        if name == "logit_bias":
            report.mapped(key, "banned_tokens ([id] lines) and logit_bias ([id] texts)", name)
            continue  # below, all entries together
        if name in seen:
            report.dropped(key, f"SillyTavern has one {name}; a second is not carried", name)
            continue
        if name in _PROCESSORS:
            if not processors_done:
                report.note(f"{key}: {name} runs before every sampler in text-generation-webui; its later "
                            "position in our order is not carried.")
        else:
            processors_done = False
        if mirostat and name not in (*_PROCESSORS, "temperature", "dynamic_temperature", "mirostat"):
            report.dropped(key, "text-generation-webui turns this sampler off while Mirostat is on", name)
            continue
        seen.add(name)
        if name == "repetition_penalty":
            out.update(rep_pen=s["penalty"], rep_pen_range=s["range"],
                       presence_pen=s["presence"], freq_pen=s["frequency"])
            if s["slope"] and not (s["slope_mode"] == "halves" and s["slope"] == 1.0):
                report.dropped(f"{key}.slope", "text-generation-webui has no repetition-penalty slope", s["slope"])
            if s["whitelist"]:
                report.dropped(f"{key}.whitelist", "SillyTavern has no repetition-penalty whitelist", s["whitelist"])
            report.mapped(key, "rep_pen, rep_pen_range, presence_pen, freq_pen", name)
            continue
        if name == "dry":
            out.update(dry_multiplier=s["multiplier"], dry_base=s["base"],
                       dry_allowed_length=s["allowed_length"], dry_penalty_last_n=s["range"],
                       dry_sequence_breakers=json.dumps(s["sequence_breakers"]))
            report.mapped(key, "dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n, "
                               "dry_sequence_breakers", name)
            continue
        if name == "no_repeat_ngram":
            out["no_repeat_ngram_size"] = s["size"]
            report.mapped(key, "no_repeat_ngram_size", name)
            continue
        if name == "xtc":
            out.update(xtc_threshold=s["threshold"], xtc_probability=s["probability"])
            report.mapped(key, "xtc_threshold, xtc_probability (runs after the other samplers)", name)
            if i != len(samplers) - 1:
                report.note(f"{key}: XTC runs after every other sampler in text-generation-webui.")
            continue
        if name == "top_n_sigma":
            out["nsigma"] = s["n"]
            report.mapped(key, "nsigma (runs after the other samplers)", name)
            continue
        if name == "adaptive_p":
            _export_adaptive_p(out, s, key, report, last=i == len(samplers) - 1)
            if s["target"] > 0:
                priority.append("adaptive_p")
            continue
        if name not in _PRIORITY_NAME:
            report.dropped(key, f"SillyTavern has no {name} sampler", name)
            continue
        if name == "temperature":
            out["temp"] = s["temperature"]
        elif name == "dynamic_temperature":
            out.update(dynatemp=True, min_temp=s["low"], max_temp=s["high"],
                       dynatemp_exponent=s["exponent"])
        elif name == "top_k":
            out["top_k"] = s["k"]
        elif name in ("top_p", "typical"):
            out[_PRIORITY_NAME[name]] = s["p"]
        elif name == "min_p":
            out["min_p"] = s["p"]
        elif name in ("epsilon", "eta"):
            out[f"{name}_cutoff"] = round(s[name] * 1e4, 8)
        elif name == "tfs":
            out["tfs"] = s["z"]
        elif name == "top_a":
            out["top_a"] = s["a"]
        elif name == "mirostat":
            out.update(mirostat_mode=s["version"], mirostat_tau=s["tau"], mirostat_eta=s["eta"])
        elif name == "quadratic":
            out.update(smoothing_factor=s["factor"], smoothing_curve=s["curve"])
        priority.append(_PRIORITY_NAME[name])
        report.mapped(key, f"{_PRIORITY_NAME[name]} (sampler_priority position {len(priority)})", name)
    bias, ban = export_entries(samplers, report, "SillyTavern")
    phrases = [p for p in preset.get("banned_strings", []) if "\n" not in p]  # one line each
    out["banned_tokens"] = "\n".join([f"[{t}]" for t in ban] + [f'"{p}"' for p in phrases])
    if phrases:
        report.mapped("banned_strings", 'banned_tokens (quoted lines)', phrases)
    if len(phrases) < len(preset.get("banned_strings", [])):
        report.note("banned_strings: phrases with a line break are not carried (SillyTavern reads one per line)")
    if preset.get("ban_case_sensitive"):
        report.dropped("ban_case_sensitive", "SillyTavern's backends compare banned strings ignoring case", True)
    out["logit_bias"] = [{"id": f"cfg-textgen-{i}", "text": f"[{t}]", "value": v}
                         for i, (t, v) in enumerate(bias.items())]
    out["grammar_string"] = preset.get("grammar", "")
    if preset.get("grammar"):
        report.mapped("grammar", "grammar_string", preset["grammar"])
    if "temperature" in seen and "dynamic_temperature" in seen:
        report.note("Both temperature and dynamic temperature: SillyTavern's dynatemp replaces temp on re-import.")
    out["sampler_priority"] = priority + [p for p in DEFAULT_PRIORITY if p not in priority]
    cfg = preset.get("cfg", {})
    if cfg.get("scale", 1.0) != 1:
        out["guidance_scale"], out["negative_prompt"] = cfg["scale"], cfg.get("opposing_prompt", "")
        report.mapped("cfg.scale", "guidance_scale", cfg["scale"])
        report.mapped("cfg.opposing_prompt", "negative_prompt", cfg.get("opposing_prompt", ""))
    else:
        report.neutral("cfg.scale", "1: guidance_scale 1", cfg.get("scale", 1.0))
        report.neutral("cfg.opposing_prompt", "unused while the scale is 1", cfg.get("opposing_prompt", ""))
    if cfg.get("opposing_mode", "text") != "text":
        report.dropped("cfg.opposing_mode", "SillyTavern has no last-token opposing branch", cfg["opposing_mode"])
    elif "opposing_mode" in cfg:
        report.neutral("cfg.opposing_mode", "text is the only mode there", "text")
    report.dropped("name", "SillyTavern keeps a preset's name in its file name", preset["name"])
    report.dropped("format", "not a SillyTavern field", preset.get("format"))
    if preset.get("description"):
        report.dropped("description", "SillyTavern presets have no description field", preset["description"])
    if "max_new_tokens" in preset:
        out["genamt"] = preset["max_new_tokens"]
        report.mapped("max_new_tokens", "genamt", preset["max_new_tokens"])
    if preset.get("stop"):
        report.dropped("stop", "stop strings belong to SillyTavern's instruct settings, not the preset", preset["stop"])
    if "do_sample" in preset:
        report.mapped("do_sample", "do_sample", preset["do_sample"])
    return out



def _export_adaptive_p(out: dict, s: dict, key: str, report, last: bool) -> None:
    """adaptive_target / adaptive_decay. The web UI runs Adaptive-P only for a target above 0
    (llama.cpp already at 0) and draws the token in it, so the samplers after it do nothing there."""
    if s["target"] < 0:
        report.neutral(key, "a negative target is off: adaptive_target -0.01, SillyTavern's off", "adaptive_p")
        return
    if s["target"] == 0:
        report.dropped(key, "target 0 is on in llama.cpp but off in text-generation-webui", "adaptive_p")
        return
    out.update(adaptive_target=s["target"], adaptive_decay=s["decay"])
    report.mapped(key, "adaptive_target, adaptive_decay", "adaptive_p")
    if not last:
        report.note(f"{key}: in text-generation-webui Adaptive-P picks the token; the samplers after it "
                    "act on that one token there.")
