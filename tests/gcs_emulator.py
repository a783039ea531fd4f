"""Runs `gcp-storage-emulator` on loopback with GCS's object preconditions added.

The emulator (a stub of the GCS JSON API) ignores `ifGenerationMatch`, which the
nightly's lease relies on (`ifGenerationMatch=0`: create only if absent; a
generation: replace or delete only that version). This launcher wraps its object
insert and delete handlers with the documented semantics (HTTP 412 when the
object's current generation, 0 if absent, differs) and then starts it:

    python tests/gcs_emulator.py --port N --default-bucket B
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects


def _current_generation(storage, bucket, name) -> int:
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except Exception:  # NotFound
        return 0


def _object_name(request):
    if "name" in request.query:
        return request.query["name"][0]
    try:
        return request.data["meta"].get("name")
    except Exception:
        return None


def _checked(handler, name_of):
    def wrapped(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if wanted:
            name = name_of(request)
            if name is not None and _current_generation(storage, request.params["bucket_name"], name) != int(wanted[0]):
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
        return handler(request, response, storage, *args, **kwargs)

    return wrapped


# Before the server module builds its routing table from these functions.
objects.insert = _checked(objects.insert, _object_name)
objects.delete = _checked(objects.delete, lambda request: request.params.get("object_id"))

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main(["start", "--host", "127.0.0.1", "--in-memory"] + sys.argv[1:])
