"""``internvl-u serve``: an OpenAI-compatible HTTP server in vLLM-Omni's InternVL-U dialect.

``command`` (argument parsing, imports nothing heavy) → ``app`` (Starlette routes, auth, limits,
streaming) → ``protocol`` (request fields → jobs, results → OpenAI-shaped responses) → ``engine``
(one model thread, a bounded queue, batching, cancellation) → ``internvl_u_core``'s public API.
"""
