"""`lqmf serve`: the model host, the continuous-batching scheduler, the HTTP server and `A+B` combinations.

- host.py: `ModelHost`, the served base, its resident adapters and the active one; `complete`/`classify`
  through its serving: `BatchedServing` (the scheduler) or `SerialServing` (PEFT slots, one at a time).
- scheduler.py: `Scheduler`, the loop thread that admits, prefills and decodes rows in batches.
- server.py: the FastAPI app (OpenAI-compatible routes, admin routes) around one ModelHost.
- combinations.py: `A+B` / `A:0.7+B:0.3` model ids, built once per combination.
- recording.py: `lqmf serve --record`, the answers kept for `lqmf feedback` and `lqmf learn`.
- recording.py: `--record`: every answer kept (core/learning.py) and POST /v1/feedback.
"""
