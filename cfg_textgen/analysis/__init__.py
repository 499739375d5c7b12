"""See what the guidance scale does: text metrics, a sweep over scales, a per-token explanation of
what CFG changed, and LAMBADA last-word accuracy (Table 1 of Sanchez et al. 2023).

Everything runs on a backend (backends/: transformers, or llama.cpp for GGUF files) through the
engine's decode loop, so the same code measures on both. A transformers model (with
its tokenizer) is wrapped in the transformers backend. Many (story, opposing) pairs run side by
side (`run_side_by_side`): a sweep's scales, and LAMBADA's examples, share each decode step on
llama.cpp (one `llama_decode` for every live sequence).

Generation is kept apart from measurement. A *generate function* `fn(prompt_ids, scale) -> new ids`
produces a continuation: `make_engine_generate_fn` is the engine's own loop on the backend (the
same `cfg_combine`, `chain.build_chain` and token pick as `write`; its `many` runs several
scales side by side); `make_generate_fn` is the `model.generate` plugin (transformers only). The
continuation is then scored by teacher forcing on the backend: the story and the opposing prompt
are prefilled as one pair and fed the generated tokens one step at a time, which gives, for every
generated token, the plain model's distribution `c` and the guided one `u + scale * (c - u)`
(`cfg_combine`, the formula generation used). On llama.cpp these are the very logits the engine
decoded while generating (a pair's logits do not depend on what else is in the batch).

Metric definitions (words = `text.split()`, i.e. whitespace-separated, case kept):

- fluency: mean over generated tokens of log p(token) under the plain model (scale 1, no samplers).
  Higher is more natural; it drops as the text "burns".
- entropy: mean over steps of the entropy (nats) of the guided distribution softmax(u + s(c - u)),
  before the preset's samplers. Guidance sharpens it; a collapse towards 0 means the model is forced.
- distinct-2: distinct word bigrams / word bigrams (Li et al. 2016). Lower = more repetitive.
- repeat-3: share of word 3-grams that already occurred earlier in the same text
  (= 1 - distinct-3). Higher = loops.
- diff-vs-1: word-level Levenshtein distance to the scale-1 text with the same seed, divided by the
  longer length: 0 = the same text, 1 = nothing in common position by position.
A metric over too few words (e.g. distinct-2 of one word) is NaN, shown as "n/a".

One file per job: metrics.py (the text metrics), side_by_side.py (many jobs on the decode loop,
teacher forcing), scoring.py (opposing branch, context cut, teacher-forced log-probabilities),
generate.py (generate functions), sweep.py, explain.py, lambada.py.
"""

from .metrics import (  # noqa: F401
    distinct_n, edit_distance, entropy, ngrams, normalized_edit_distance, repeated_ngram_rate)
from .side_by_side import (  # noqa: F401
    DEFAULT_SCALES, Forced, GenerateFn, LANES, MAX_LANES, MAX_WORD_TOKENS, Progress, WINDOW_STEP,
    run_side_by_side)
from .scoring import (  # noqa: F401
    Opposing, encode_prompt, score_continuation)
from .generate import (  # noqa: F401
    EngineGenerate, _strip_eos_padding, make_engine_generate_fn, make_generate_fn)
from .sweep import (  # noqa: F401
    METRIC_LABELS, METRICS, SweepRow, parse_scales, score_row, score_rows, sweep, text_metrics)
from .explain import (  # noqa: F401
    Candidate, ExplainStep, explain, explain_steps)
from .lambada import (  # noqa: F401
    LambadaExample, LambadaPrediction, LambadaResult, RULES, UntilWord, eval_lambada, first_word,
    lambada_generation, lambada_opposing, read_lambada, split_last_word, strip_punctuation,
    target_token_ids, word_complete, word_matches)
