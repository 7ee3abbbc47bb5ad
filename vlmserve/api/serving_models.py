"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from vlmserve.api import schemas
from vlmserve.errors import ModelNotFoundError


class ModelsService:
    def __init__(self, served_model_names: tuple[str, ...], created: int, *,
                 grounding_format: str | None = None) -> None:
        self._cards = [schemas.ModelCard(id=name, created=created, grounding_format=grounding_format)
                       for name in served_model_names]

    def list(self) -> schemas.ModelList:
        return schemas.ModelList(data=self._cards)

    def get(self, model_id: str) -> schemas.ModelCard:
        for card in self._cards:
            if card.id == model_id:
                return card
        raise ModelNotFoundError(f"the model {model_id!r} does not exist here", param="model")
