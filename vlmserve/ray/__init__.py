"""Scale-out on Ray Serve (`pip install 'vlmserve[ray]'`): N engine replicas behind one OpenAI ingress.

- `replica`: `EngineReplica`, one engine (one GPU, or CPU) per Ray Serve replica.
- `router`: `ImageAwarePrefixRouter`, least load plus prefix affinity keyed by the prefix cache's block hashes,
  which include the content hashes of the request's images.
- `client`: `RayEngineClient`, the `EngineClient` the ingress's FastAPI app holds (the same app `vlmserve serve`
  runs); `stats_board`: the per-replica engine counters behind /stats, /health and /metrics.
- `app`: the application (`vlmserve serve --ray`, or `serve run vlmserve.ray.app:build` with a config file).
"""
