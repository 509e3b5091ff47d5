"""Webhooks, the whole domain: what a job event announces and to whom, and getting it there.

- `outbox`     the delivery rows a job event creates, written in that event's own transaction
- `secret_list` the signing secrets of an endpoint (encrypted at rest), rotation, and which secrets sign a delivery
- `signing`    Standard Webhooks signatures (the `standardwebhooks` package signs)
- `delivery`   one signed HTTP attempt through the SSRF-safe client, and the retry schedule (no database)
- `sender`     the I/O worker's side: one attempt of one outbox row, recorded, the next one scheduled
- `service`    account endpoints (create, list, delete, rotate) and a job's deliveries (list, redeliver)
- `urls`       the check of a webhook URL at submission (delivery checks again, at send time)

Nothing here imports FastAPI: the worker imports this package; the API's router (`qaas.api.webhooks`)
parses, authorizes and calls `service`.
"""
