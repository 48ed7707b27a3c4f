"""The client-machine tools: `registry-gateway client docker|containerd|podman|k8s`, `doctor`
and `warm`.

They learn the gateway's routes from its `/_gateway/routes` listing (gateway.wire), a
routes.yaml, or the presets; they never import the server side and never need a secret.
"""
