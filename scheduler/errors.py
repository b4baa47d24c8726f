"""gRPC errors with google.rpc details (BadRequest field violations)."""

from __future__ import annotations

from typing import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class ApiError(Exception):
    """An error the API reports: a status code, a message, and the fields at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = list(violations)

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.violations]))
            status.details.append(detail)
        return rpc_status.to_status(status)


def invalid(violations: Sequence[tuple[str, str]], what: str = "request") -> ApiError:
    """INVALID_ARGUMENT listing every field violation in the message and the details."""
    lines = "; ".join(f"{f}: {d}" for f, d in violations)
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid {what}: {lines}", violations)


def not_found(message: str, field: str = "") -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, message, [(field, message)] if field else ())


def failed_precondition(message: str, field: str = "") -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, message, [(field, message)] if field else ())
