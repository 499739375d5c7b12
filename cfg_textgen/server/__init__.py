"""`cfg-textgen serve`: text-generation-webui's OpenAI-compatible API and the KoboldAI API (as
KoboldCpp serves it) over the engine, for SillyTavern, Kobold Lite and OpenAI clients; also
llama.cpp server's own API and TabbyAPI's status routes (SillyTavern's other two CFG types).

    app.py         routes, API key, body limit, CORS, disconnects
    webui.py       the web UI API's envelope and response shapes
    kobold.py      the KoboldAI API's envelope and response shapes
    llamacpp.py    llama.cpp server's /completion and TabbyAPI's routes: envelopes and shapes
    llamacpp_routes.py  their handlers
    logprobs.py    token log-probabilities in each API's shape
    defaults.py    serve --preset / --cfg-scale / --opposing: defaults a request does not override
    translate.py   sampler fields -> Preset, through the importers of the same apps' preset files
    errors.py      error shapes per API, typed field reads
    scheduling.py  the loaded backend and the engine's Scheduler; which API runs which job
    serve.py       the process: uvicorn, SIGTERM, warnings
"""

from .serve import serve

__all__ = ["serve"]
