"""Routes of the saved Hub token: `PUT/GET/DELETE /v1/hub-token` (thin: parse, call the service)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from qaas.api.deps import CallerDep, SessionDep, SettingsDep
from qaas.api.hub_token import service
from qaas.api.hub_token.schemas import HubTokenIn, HubTokenStatus

router = APIRouter(prefix="/v1/hub-token", tags=["hub-token"])


@router.put("", status_code=204, operation_id="put_hub_token")
def put_hub_token(body: HubTokenIn, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """Save your Hub token (encrypted at rest, never returned) for jobs that bring none."""
    service.save(session, settings, caller.owner, body.token.get_secret_value())
    return Response(status_code=204)


@router.get("", response_model=HubTokenStatus, operation_id="get_hub_token_status")
def get_hub_token(caller: CallerDep, session: SessionDep):
    saved_at = service.saved_at(session, caller.owner)
    return HubTokenStatus(configured=saved_at is not None, updated_at=saved_at)


@router.delete("", status_code=204, operation_id="delete_hub_token")
def delete_hub_token(caller: CallerDep, session: SessionDep):
    service.forget(session, caller.owner)
    return Response(status_code=204)
