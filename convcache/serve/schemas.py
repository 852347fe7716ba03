"""The service's typed answers (response models) and the OpenAPI description of an image upload."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    class_: str = Field(alias="class", description="the most probable class")
    probabilities: dict[str, float] = Field(description="probability of each class")
    cached: bool = Field(description="answered from the content-addressed cache")


class PredictResponse(BaseModel):
    model: str = Field(description="the model id: the fused model's identity (see `convcache info`)")
    predictions: list[Prediction]


class FeatureVector(BaseModel):
    features: list[float]
    cached: bool


class FeaturesResponse(BaseModel):
    model: str
    features: list[FeatureVector]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in one line")


class ModelInfo(BaseModel):
    model: str
    provider: str
    classes: list[str]
    input_size: int
    extractor: dict
    head: str | None


IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "one or more image files (any field name is accepted)"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "or one image as the raw body"},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}
ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "malformed multipart body"), (413, "body too large"), (415, "not an image"),
    (422, "corrupt image, too many pixels, or no files"), (503, "overloaded"))}
