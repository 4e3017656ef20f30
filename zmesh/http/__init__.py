"""OpenAI-compatible HTTP API of a node (`[http]` in the node config): `server`
serves it, `openai` holds the request and response shapes."""

from zmesh.http.server import HttpFront

__all__ = ["HttpFront"]
