"""The console's JSON API (placeholder: H2 owns this module)."""

from fastapi import APIRouter

router = APIRouter()
