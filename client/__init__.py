"""The thin client of editfleet's edit service: grpcio, grpcio-status and protobuf only.

    from editfleet.client import EditClient
    with EditClient("127.0.0.1:50051") as client:
        job = client.submit("gemma3-270m", [{"prompt": "The Eiffel Tower is in the city of",
                                             "subject": "Eiffel Tower", "target_new": "Rome"}])
        job = client.wait(job)
        print(job.checkpoint, client.query(job.checkpoint, "The Eiffel Tower is in the city of", ["Rome"]))
"""

from .client import EditClient, EditFleetError
from .records import RecordError, read_edits, to_edit

__all__ = ["EditClient", "EditFleetError", "RecordError", "read_edits", "to_edit"]
