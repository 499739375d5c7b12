"""NovelAI presets: the official export (`presetVersion`, `parameters`, `order` of {id, enabled}) and
SillyTavern's flattened copy (no wrapper, numeric `order`).

Semantics (NovelAI API, Aedial/novelai-api, SillyTavern nai-settings):
- `order` lists the samplers NovelAI applies, in order; disabled entries (official) and ids absent
  from the list (SillyTavern) are not applied at all.
- Repetition penalty is not in `order`. We apply it first, right after CFG, on the guided logits,
  as every other backend does with penalties (decision; NovelAI does not document it).
- CFG (id 6, `cfg_scale`, `cfg_uc`) runs first in cfg-textgen, as in NovelAI, wherever it is listed.
- Repetition-penalty values are carried unchanged. Presets for the pre-Krake models (2.7B,
  6B-v4, euterpe-v2) use values around 2-4 on a scale NovelAI never published; we do not guess a
  conversion and say so in the report.
"""

from __future__ import annotations

from ._common import (FORMAT_TAG, Builder, fmt_num, repetition_penalty_entry, simple_sampler,
                      temperature_sampler, top_p_sampler)
from .steering import export_entries, novelai_steering, sillytavern_steering

ORDER_IDS = ["temperature", "top_k", "top_p", "tfs", "top_a", "typical_p", "cfg", "top_g", "mirostat",
             "math1", "min_p"]

# the value keys that belong to each order id
SAMPLER_KEYS = {
    "temperature": ["temperature"],
    "top_k": ["top_k"],
    "top_p": ["top_p"],
    "tfs": ["tail_free_sampling"],
    "top_a": ["top_a"],
    "typical_p": ["typical_p"],
    "cfg": ["cfg_scale", "cfg_uc"],
    "top_g": ["top_g"],
    "mirostat": ["mirostat_tau", "mirostat_lr"],
    "math1": ["math1_temp", "math1_quad", "math1_quad_entropy_scale"],
    "min_p": ["min_p"],
}

OFF_VALUES = {"temperature": 1, "top_k": 0, "top_p": 1, "tail_free_sampling": 1, "top_a": 0, "typical_p": 1,
              "cfg_scale": 1, "cfg_uc": "", "top_g": 0, "mirostat_tau": 0, "min_p": 0,
              "math1_temp": 1, "math1_quad": 0, "math1_quad_entropy_scale": 0}

REP_KEYS = ["repetition_penalty", "repetition_penalty_range", "repetition_penalty_slope",
            "repetition_penalty_frequency", "repetition_penalty_presence"]

METADATA = {"presetVersion", "id", "remoteId", "model", "textGenerationSettingsVersion"}
TOKEN_ID_KEYS = {"bad_words_ids", "logit_bias_exp", "logit_bias_groups", "stop_sequences",
                 "repetition_penalty_whitelist", "banned_tokens"}
LEGACY_MODELS = {"2.7B", "6B-v4", "euterpe-v2", "genji-jp-6b-v2", "genji-python-6b"}


def looks_official(data: dict) -> bool:
    return "presetVersion" in data or isinstance(data.get("parameters"), dict)


def looks_flat(data: dict) -> bool:
    nai_keys = {"tail_free_sampling", "repetition_penalty_range", "cfg_scale", "math1_temp", "phrase_rep_pen",
                "repetition_penalty_frequency"}
    return isinstance(data.get("order"), list) and bool(nai_keys & data.keys()) and "temp" not in data


def import_official(data: dict, source: str, name: str | None, stem: str | None):
    top = Builder(source, "NovelAI preset (official export)", data)
    params = top.data.get("parameters")
    if not isinstance(params, dict):
        raise top.error("parameters", "must be an object of generation settings")
    b = Builder(source, top.report.format, params, prefix="parameters.")
    b.report = top.report  # one report for both levels
    version = b.num("textGenerationSettingsVersion", integer=True)
    order = _read_order(b, numeric=False)
    model = top.string("model")
    _translate(b, order, model)
    b.dropped("textGenerationSettingsVersion", f"format metadata (settings version {version}); read as such")
    for key in ("presetVersion", "id", "remoteId"):
        top.dropped(key, "format metadata")
    top.dropped("model", "the NovelAI model the preset was made for; cfg-textgen uses the model you load")
    preset_name = top.string("name")
    if name:
        top.dropped("name", f"replaced by the name given: {name!r}")
    else:
        top.mapped("name", "name")
    preset = b.finish(name, preset_name or stem, _describe("NovelAI", preset_name, model, source))
    for key in top.data:
        if key != "parameters" and not top.reported(key):
            top.dropped(key, "unknown key: no cfg-textgen equivalent")
    return preset, b.report


def import_flat(data: dict, source: str, name: str | None, stem: str | None):
    b = Builder(source, "NovelAI preset (SillyTavern flattened)", data)
    order = _read_order(b, numeric=True)
    _translate(b, order, None)
    preset_name = b.string("name") if isinstance(data.get("name"), str) else None
    if "name" in data:
        b.mapped("name", "name") if not name else b.dropped("name", f"replaced by the name given: {name!r}")
    preset = b.finish(name, preset_name or stem, _describe("NovelAI (SillyTavern)", preset_name, None, source))
    return preset, b.report


def _describe(kind: str, preset_name, model, source: str) -> str:
    what = f" '{preset_name}'" if preset_name else ""
    for_model = f" for {model}" if model else ""
    return f"Imported from the {kind} preset{what}{for_model} ({source.rsplit('/', 1)[-1]})."


def _read_order(b: Builder, numeric: bool) -> list[tuple[str, bool]]:
    """[(id name, enabled)] from either order style; unknown or repeated ids are errors."""
    raw = b.list_("order")
    if raw is None:
        raise b.error("order", "missing: a NovelAI preset lists its samplers in `order`")
    order, seen = [], set()
    for i, item in enumerate(raw):
        enabled = True
        if isinstance(item, dict):
            sid = item.get("id")
            enabled = item.get("enabled", True)
            if not isinstance(enabled, bool):
                raise b.error(f"order[{i}].enabled", f"must be true or false, got {enabled!r}")
        else:
            sid = item
        if isinstance(sid, bool):
            sid = None
        if isinstance(sid, int) and 0 <= sid < len(ORDER_IDS):
            sid = ORDER_IDS[sid]
        if sid not in SAMPLER_KEYS:
            raise b.error(f"order[{i}]", f"unknown sampler id {sid!r}; known: {ORDER_IDS} (or 0-{len(ORDER_IDS) - 1})")
        if sid in seen:
            raise b.error(f"order[{i}]", f"sampler {sid!r} is listed twice")
        seen.add(sid)
        order.append((sid, enabled))
    return order


def _translate(b: Builder, order: list[tuple[str, bool]], model: str | None) -> None:
    """Fill b.samplers / b.cfg from the NovelAI settings and report every key."""
    applied = [sid for sid, enabled in order if enabled]
    _repetition_penalty(b, model)
    for sid in applied:
        _apply(b, sid)
    # value keys of samplers that are disabled or not listed
    for sid, keys in SAMPLER_KEYS.items():
        if sid in applied:
            continue
        why = "disabled in order" if any(s == sid for s, _ in order) else "not listed in order"
        for key in keys:
            if key in OFF_VALUES and b.has(key) and b.data[key] == OFF_VALUES[key]:
                b.neutral(key, f"{why}, and {fmt_num(OFF_VALUES[key]) if key != 'cfg_uc' else 'empty'} is off anyway")
            else:
                b.dropped(key, f"{sid} is {why}, so NovelAI does not apply it")
    if "cfg" in applied and applied[0] != "cfg":
        b.note("CFG runs first in cfg-textgen (as in NovelAI), although `order` lists it later.")
    disabled = [sid for sid, enabled in order if not enabled]
    b.mapped("order", "sampler order" + (f" (disabled, not applied: {', '.join(disabled)})" if disabled else ""))
    _other_keys(b)


def _apply(b: Builder, sid: str) -> None:
    if sid == "temperature":
        temperature_sampler(b, "temperature")
    elif sid == "top_k":
        simple_sampler(b, "top_k", "top_k", "k", 0, integer=True)
    elif sid == "top_p":
        top_p_sampler(b, "top_p")
    elif sid == "typical_p":
        top_p_sampler(b, "typical_p", "typical")
    elif sid == "tfs":
        value = b.num("tail_free_sampling")
        if value is not None and value >= 1:
            b.neutral("tail_free_sampling", "tfs 1 is off")
        elif value is not None:
            b.add({"sampler": "tfs", "z": value})
            b.mapped("tail_free_sampling", "tfs.z")
    elif sid == "top_a":
        simple_sampler(b, "top_a", "top_a", "a", 0)
    elif sid == "min_p":
        simple_sampler(b, "min_p", "min_p", "p", 0)
    elif sid == "cfg":
        scale = b.num("cfg_scale", 1)
        uc = b.string("cfg_uc", "")
        if scale == 1:
            b.neutral("cfg_scale", "scale 1 is plain generation")
            b.neutral("cfg_uc", "unused while the cfg scale is 1") if uc else b.neutral("cfg_uc", "empty: a blank story")
        else:
            b.cfg = {"scale": scale, "opposing_prompt": uc}
            b.mapped("cfg_scale", "cfg.scale")
            b.mapped("cfg_uc", "cfg.opposing_prompt") if uc else b.neutral("cfg_uc", "empty: a blank story (our default)")
    elif sid == "top_g":
        value = b.num("top_g")
        if value == 0:
            b.neutral("top_g", "0 is off")
        else:
            b.dropped("top_g", "Top-G has no public algorithm; not guessed")
    elif sid == "mirostat":
        tau, lr = b.num("mirostat_tau"), b.num("mirostat_lr")
        if not tau:
            b.neutral("mirostat_tau", "tau 0 is off")
            b.neutral("mirostat_lr", "unused while mirostat is off")
        else:
            sampler = {"sampler": "mirostat", "version": 2, "tau": tau}
            if lr is not None:
                sampler["eta"] = lr
            b.add(sampler)
            b.mapped("mirostat_tau", "mirostat.tau (version 2)")
            b.mapped("mirostat_lr", "mirostat.eta (learning rate)")
            b.note("NovelAI's Mirostat is taken as Mirostat 2.0 (tau = target surprise, lr = eta).")
    elif sid == "math1":
        lin = b.num("math1_temp", 1)
        quad = b.num("math1_quad", 0)
        conf = b.num("math1_quad_entropy_scale", 0)
        if (lin, quad, conf) == (1, 0, 0):
            for key in SAMPLER_KEYS["math1"]:
                b.neutral(key, "unified sampling with linear 1, quad 0, conf 0 is off")
        else:
            b.add({"sampler": "unified", "linear": lin, "quad": quad, "conf": conf})
            b.mapped("math1_temp", "unified.linear")
            b.mapped("math1_quad", "unified.quad")
            b.mapped("math1_quad_entropy_scale", "unified.conf")


def _repetition_penalty(b: Builder, model: str | None) -> None:
    penalty = b.num("repetition_penalty", 1)
    rng = b.num("repetition_penalty_range", 0, integer=True)
    slope = b.num("repetition_penalty_slope", 0)
    freq = b.num("repetition_penalty_frequency", 0)
    pres = b.num("repetition_penalty_presence", 0)
    if penalty == 1 and freq == 0 and pres == 0:
        b.neutral("repetition_penalty", "1 is off (and no frequency or presence penalty)")
        for key in REP_KEYS[1:]:
            b.neutral(key, "no effect while the repetition penalty is off")
    else:
        # NovelAI's slope is the curve KoboldAI United copied (over the range); no range, no curve
        b.samplers.insert(0, repetition_penalty_entry(penalty, range=rng, slope=slope if rng else 0,
                                                      presence=pres, frequency=freq))
        b.mapped("repetition_penalty", "repetition_penalty.penalty (applied first, right after CFG)")
        b.mapped("repetition_penalty_range", "repetition_penalty.range") if rng else b.neutral(
            "repetition_penalty_range", "0 means the whole context (our default)")
        if slope and rng:
            b.mapped("repetition_penalty_slope", "repetition_penalty.slope (the curve over the range, "
                                                 "slope_mode curve, as KoboldAI United reads it)")
        elif slope:
            b.neutral("repetition_penalty_slope", "the slope curve is built over repetition_penalty_range; "
                                                  "with range 0 the penalty is flat (KoboldAI's reading)")
        else:
            b.neutral("repetition_penalty_slope", "0 is a flat penalty (our default)")
        b.mapped("repetition_penalty_frequency", "repetition_penalty.frequency") if freq else b.neutral(
            "repetition_penalty_frequency", "0 is off")
        b.mapped("repetition_penalty_presence", "repetition_penalty.presence") if pres else b.neutral(
            "repetition_penalty_presence", "0 is off")
        b.note("NovelAI's repetition penalty is not part of `order`; cfg-textgen applies it first, right "
               "after CFG, before every sampler in the order (decision: NovelAI does not document it).")
        if model in LEGACY_MODELS or penalty > 2:
            b.note(f"repetition_penalty {fmt_num(penalty)} is carried unchanged. Presets for NovelAI's "
                   "pre-Krake models (2.7B, 6B-v4, euterpe-v2) use values around 2-4 on a scale NovelAI "
                   "never published; KoboldAI's ports of the same presets use about 1.05-1.2. Lower it "
                   "if the text avoids every earlier word.")
    whitelist = b.list_("repetition_penalty_whitelist")
    if whitelist is not None:
        (b.neutral if not whitelist else b.dropped)(
            "repetition_penalty_whitelist",
            "empty" if not whitelist else "token ids of NovelAI's tokenizer; they mean other tokens in ours")
    default_wl = b.boolean("repetition_penalty_default_whitelist")
    if default_wl is not None:
        if default_wl:
            b.dropped("repetition_penalty_default_whitelist",
                      "NovelAI's built-in exemption list is token ids of its own tokenizer; not available")
        else:
            b.neutral("repetition_penalty_default_whitelist", "false: no exemptions")


def _other_keys(b: Builder) -> None:
    length = b.num("max_length", integer=True)
    if length is not None:
        b.extra["max_new_tokens"] = length
        b.mapped("max_length", "max_new_tokens")
    min_length = b.num("min_length", integer=True)
    if min_length is not None:
        (b.neutral if min_length <= 1 else b.dropped)(
            "min_length", "at least one token is always generated" if min_length <= 1
            else "cfg-textgen has no minimum length")
    phrase = b.data.get("phrase_rep_pen")
    if "phrase_rep_pen" in b.data:
        if phrase in ("off", None, ""):
            b.neutral("phrase_rep_pen", "off")
        else:
            b.dropped("phrase_rep_pen", "phrase repetition penalty has no public algorithm; not guessed")
    prefix = b.data.get("prefix")
    if "prefix" in b.data:
        (b.neutral if prefix == "vanilla" else b.dropped)(
            "prefix", "vanilla: no module" if prefix == "vanilla" else "NovelAI modules do not exist here")
    b.dropped("use_cache", "NovelAI request option (response caching), not a sampling setting")
    b.dropped("return_full_text", "NovelAI request option, not a sampling setting")
    b.dropped("max_context", "the context size is the loaded model's")
    b.dropped("generate_until_sentence", "cfg-textgen has no sentence-completion option")
    novelai_steering(b)  # logit_bias_exp, bad_words_ids
    if isinstance(b.data.get("banned_tokens"), str):  # SillyTavern's flattened copy: its text lines
        sillytavern_steering(b)
    for key in sorted(TOKEN_ID_KEYS - {"repetition_penalty_whitelist", "logit_bias_exp", "bad_words_ids"}):
        if b.reported(key):
            continue
        if key in b.data:
            value = b.data[key]
            if value in ("", [], None):
                b.neutral(key, "empty")
            else:
                b.dropped(key, "token ids/strings for NovelAI's tokenizer and bans; not carried")


# ---- export -----------------------------------------------------------------------------------

_EXPORTABLE = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "tfs": "tfs",
               "top_a": "top_a", "typical": "typical_p", "mirostat": "mirostat", "unified": "math1",
               "min_p": "min_p"}


def export(preset: dict, report) -> dict:
    """Our preset dict -> a NovelAI official export (presetVersion 3, settings version 7)."""
    params = {"textGenerationSettingsVersion": 7, "temperature": 1, "max_length": preset.get("max_new_tokens", 200),
              "min_length": 1, "top_k": 0, "top_p": 1, "top_a": 0, "typical_p": 1, "tail_free_sampling": 1,
              "repetition_penalty": 1, "repetition_penalty_range": 0, "repetition_penalty_slope": 0,
              "repetition_penalty_frequency": 0, "repetition_penalty_presence": 0,
              "repetition_penalty_default_whitelist": False, "cfg_scale": 1, "cfg_uc": "", "phrase_rep_pen": "off",
              "top_g": 0, "mirostat_tau": 0, "mirostat_lr": 1, "math1_temp": 1, "math1_quad": 0,
              "math1_quad_entropy_scale": 0, "min_p": 0}
    enabled: list[str] = []
    rep_done = False
    cfg = preset.get("cfg", {})
    scale = cfg.get("scale", 1.0)
    if scale != 1:
        params["cfg_scale"] = scale
        params["cfg_uc"] = cfg.get("opposing_prompt", "")
        enabled.append("cfg")
        report.mapped("cfg.scale", "cfg_scale (order id cfg, enabled)", scale)
        report.mapped("cfg.opposing_prompt", "cfg_uc", cfg.get("opposing_prompt", ""))
    else:
        report.neutral("cfg.scale", "1: cfg disabled", scale)
        report.neutral("cfg.opposing_prompt", "unused while the scale is 1", cfg.get("opposing_prompt", ""))
    if cfg.get("opposing_mode", "text") != "text":
        report.dropped("cfg.opposing_mode", "NovelAI has no last-token opposing branch", cfg.get("opposing_mode"))
    elif "opposing_mode" in cfg:
        report.neutral("cfg.opposing_mode", "text is NovelAI's behaviour", "text")
    for i, s in enumerate(preset.get("samplers", [])):
        key, name = f"samplers[{i}]", s["sampler"]
        if name == "repetition_penalty":
            if i != 0:
                report.note(f"{key}: NovelAI applies the repetition penalty before every sampler; its position "
                            "in our order is not carried.")
            if s["whitelist"]:
                report.dropped(f"{key}.whitelist", "token ids of our tokenizer mean other tokens in NovelAI's",
                               s["whitelist"])
            if rep_done:
                report.dropped(key, "NovelAI has one repetition penalty; a second is not carried", name)
                continue
            halves = s["slope_mode"] == "halves"
            if halves and s["slope"] != 1.0:
                report.dropped(f"{key}.slope", "KoboldCpp's two-step slope (slope_mode halves); NovelAI's "
                               "slope is the curve over the range", s["slope"])
            params.update(repetition_penalty=s["penalty"], repetition_penalty_range=s["range"],
                          repetition_penalty_slope=0.0 if halves else s["slope"],
                          repetition_penalty_frequency=s["frequency"],
                          repetition_penalty_presence=s["presence"])
            rep_done = True
            report.mapped(key, "repetition_penalty, _range, _slope, _frequency, _presence", name)
            continue
        if name == "logit_bias":
            continue  # below, all entries together
        nid = _EXPORTABLE.get(name)
        if nid is None:
            report.dropped(key, f"NovelAI has no {name} sampler", name)
            continue
        if nid in enabled:
            report.dropped(key, f"NovelAI lists each sampler once; a second {name} is not carried", name)
            continue
        if name == "temperature":
            params["temperature"] = s["temperature"]
        elif name == "top_k":
            params["top_k"] = s["k"]
        elif name in ("top_p", "typical", "min_p"):
            params[nid] = s["p"]
        elif name == "tfs":
            params["tail_free_sampling"] = s["z"]
        elif name == "top_a":
            params["top_a"] = s["a"]
        elif name == "mirostat":
            if s["version"] != 2:
                report.dropped(key, "NovelAI's Mirostat is version 2; a version-1 sampler is not carried", name)
                continue
            params["mirostat_tau"], params["mirostat_lr"] = s["tau"], s["eta"]
        elif name == "unified":
            params["math1_temp"], params["math1_quad"] = s["linear"], s["quad"]
            params["math1_quad_entropy_scale"] = s["conf"]
        enabled.append(nid)
        report.mapped(key, f"order id {nid} (enabled)", name)
    bias, ban = export_entries(preset.get("samplers", []), report, "NovelAI")
    for i, s in enumerate(preset.get("samplers", [])):
        if s["sampler"] == "logit_bias":
            report.mapped(f"samplers[{i}]", "logit_bias_exp (one-token entries) and bad_words_ids", "logit_bias")
    if bias:
        params["logit_bias_exp"] = [{"sequence": [t], "bias": v, "ensure_sequence_finish": False,
                                     "generate_once": False} for t, v in bias.items()]
    if ban:
        params["bad_words_ids"] = [[t] for t in ban]
    if bias or ban:
        report.note("Token ids are carried unchanged: NovelAI reads them with its own tokenizer.")
    if preset.get("grammar"):
        report.dropped("grammar", "NovelAI has no grammars", preset["grammar"])
    if preset.get("banned_strings"):
        report.dropped("banned_strings", "NovelAI bans token sequences of its own tokenizer (bad_words_ids), "
                       "not text", preset["banned_strings"])
    rest = [sid for sid in ORDER_IDS if sid not in enabled]
    params["order"] = [{"id": sid, "enabled": True} for sid in enabled] + [
        {"id": sid, "enabled": False} for sid in rest]
    _export_top_level(preset, report)
    return {"presetVersion": 3, "name": preset["name"], "id": "", "remoteId": "", "parameters": params,
            "model": "llama-3-erato-v1"}


def _export_top_level(preset: dict, report) -> None:
    report.mapped("name", "name", preset["name"])
    report.dropped("format", "NovelAI files carry their own version fields", preset.get("format", FORMAT_TAG))
    if preset.get("description"):
        report.dropped("description", "NovelAI presets have no description field", preset["description"])
    if "max_new_tokens" in preset:
        report.mapped("max_new_tokens", "parameters.max_length", preset["max_new_tokens"])
    if preset.get("stop"):
        report.dropped("stop", "NovelAI stop sequences are token ids of its tokenizer", preset["stop"])
    if preset.get("do_sample", True) is False:
        report.dropped("do_sample", "NovelAI always samples; greedy decoding is not carried", False)
    report.note("NovelAI applies the repetition penalty before the samplers in `order`; the export assumes "
                "that, as the importer does.")

