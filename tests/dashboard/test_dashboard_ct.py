"""The submit form's compressed-tensors method: the request it builds, the rules' refusal shown beside the form,
the job page's method label."""

from __future__ import annotations

import re
from types import SimpleNamespace

from conftest import STORIES, auth

from qaas.api.dashboard import views

ORIGIN = {"Origin": "http://testserver"}


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def _sign_in(client, key: str) -> str:
    page = client.get("/dashboard/login")
    client.post("/dashboard/login", data={"api_key": key, "csrf_token": _csrf(page.text), "next": "/dashboard/jobs"},
                headers=ORIGIN, follow_redirects=False)
    return client.get("/dashboard/jobs/new").text


def _body(html: str, **fields) -> dict:
    return {"csrf_token": _csrf(html), "model": str(STORIES), "method": "ct", "evaluate": "on", "priority": "0",
            "bits": "4", "group_size": "128", **fields}


def test_submit_compressed_tensors_from_the_form(client, api_key):
    html = _sign_in(client, api_key)
    assert 'value="ct"' in html and 'name="ct_scheme"' in html
    r = client.post("/dashboard/jobs", data=_body(html, ct_scheme="W4A16", ct_group_size="32"), headers=ORIGIN,
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    jid = r.headers["location"].split("/")[-1].split("?")[0]
    qc = client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()["request"]["quantization_config"]
    assert (qc["quant_method"], qc["scheme"], qc["group_size"], qc["weights"]) == ("compressed-tensors", "W4A16", 32,
                                                                                    "rtn")
    assert "compressed-tensors W4A16 g32" in client.get(f"/dashboard/jobs/{jid}").text
    # static FP8 without calibration data: the rules' message, nothing stored
    r = client.post("/dashboard/jobs", data=_body(html, ct_scheme="FP8"), headers=ORIGIN)
    assert r.status_code == 422 and "quantization_config.dataset" in r.text and "static input scales" in r.text
    # FP8_BLOCK on stories260K (hidden 64): refused at submission from its config.json
    r = client.post("/dashboard/jobs", data=_body(html, ct_scheme="FP8_BLOCK"), headers=ORIGIN)
    assert r.status_code == 422 and "quantization_config.scheme" in r.text and "not a multiple of 128" in r.text
    assert len(client.get("/v1/jobs", headers=auth(api_key)).json()["items"]) == 1


def test_method_labels():
    def job(qc):
        return SimpleNamespace(method="compressed-tensors", bits=8, request={"quantization_config": qc})

    assert views.method_label(job({"scheme": "FP8_DYNAMIC", "weights": "rtn"})) == "compressed-tensors FP8_DYNAMIC"
    assert views.method_label(job({"scheme": "W4A16", "group_size": 128, "weights": "gptq"})) == \
        "compressed-tensors W4A16 g128 GPTQ"
    assert views.method_label(job({"scheme": "W8A8", "smoothing_strength": 0.8})) == "compressed-tensors W8A8 +SQ"
