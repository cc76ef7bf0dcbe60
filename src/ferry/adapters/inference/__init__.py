"""What an inference at the committed version needs, shared by the front ends that serve one (the gateway and
the MLflow plugin's predict): the route to the committed version (or a canary's share), the guard that checks a
request against the version's config, and the request bodies it reads. It imports no other adapter."""
