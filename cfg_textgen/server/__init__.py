"""`cfg-textgen serve`: text-generation-webui's OpenAI-compatible API and the KoboldAI API (as
KoboldCpp serves it) over the engine, for SillyTavern, Kobold Lite and OpenAI clients.

    app.py         routes, API key, body limit, CORS, disconnects
    webui.py       the web UI API's envelope and response shapes
    kobold.py      the KoboldAI API's envelope and response shapes
    translate.py   sampler fields -> Preset, through the importers of the same apps' preset files
    errors.py      error shapes per API, typed field reads
    scheduling.py  the loaded backend and the engine's Scheduler; which API runs which job
    serve.py       the process: uvicorn, SIGTERM, warnings
"""

from .serve import serve

__all__ = ["serve"]
