"""A small synchronous client for AdapterRegistryService, used by the CLI and tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from loraplex.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.client.adapter_dir import AdapterDirError, check_adapter_dir
from services.common.tls import TlsFiles, sync_channel

UPLOAD_CHUNK_BYTES = 1 << 20


class RegistryClient:
    def __init__(
        self, target: str, token: str | None, *, tls: TlsFiles | None, timeout_s: float = 60.0
    ) -> None:
        """tls: the identity to present (the operator's for the CLI); None: a plaintext registry."""
        self._channel = sync_channel(target, tls)
        self._stub = registry_pb2_grpc.AdapterRegistryServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stub(self) -> registry_pb2_grpc.AdapterRegistryServiceStub:
        return self._stub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def create_tenant(self, name: str) -> registry_pb2.Tenant:
        req = registry_pb2.CreateTenantRequest(name=name)
        return self._stub.CreateTenant(req, metadata=self._metadata, timeout=self._timeout).tenant

    def list_tenants(self) -> list[registry_pb2.Tenant]:
        resp = self._stub.ListTenants(
            registry_pb2.ListTenantsRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return list(resp.tenants)

    def set_tenant_limits(
        self,
        tenant: str,
        *,
        requests_per_s: int | None = None,
        tokens_per_min: int | None = None,
        max_concurrent: int | None = None,
        monthly_tokens: int | None = None,
    ) -> registry_pb2.Tenant:
        """Changes the limits given (None keeps one, 0 clears one: unlimited)."""
        req = registry_pb2.SetTenantLimitsRequest(
            tenant=tenant,
            requests_per_s=requests_per_s,
            tokens_per_min=tokens_per_min,
            max_concurrent=max_concurrent,
            monthly_tokens=monthly_tokens,
        )
        return self._stub.SetTenantLimits(req, metadata=self._metadata, timeout=self._timeout).tenant

    def create_api_key(self, tenant: str, name: str = "default") -> registry_pb2.CreateApiKeyResponse:
        req = registry_pb2.CreateApiKeyRequest(tenant=tenant, name=name)
        return self._stub.CreateApiKey(req, metadata=self._metadata, timeout=self._timeout)

    def revoke_api_key(self, key_id: str) -> registry_pb2.ApiKey:
        req = registry_pb2.RevokeApiKeyRequest(key_id=key_id)
        return self._stub.RevokeApiKey(req, metadata=self._metadata, timeout=self._timeout).api_key

    def upsert_base_model(self, model: registry_pb2.BaseModel) -> registry_pb2.BaseModel:
        req = registry_pb2.UpsertBaseModelRequest(base_model=model)
        return self._stub.UpsertBaseModel(req, metadata=self._metadata, timeout=self._timeout).base_model

    def list_base_models(self) -> list[registry_pb2.BaseModel]:
        req = registry_pb2.ListBaseModelsRequest()
        return list(
            self._stub.ListBaseModels(req, metadata=self._metadata, timeout=self._timeout).base_models
        )

    def register_adapter(
        self,
        *,
        tenant: str,
        name: str,
        base_model: str,
        uri: str,
        keep_warm: bool = False,
        description: str = "",
    ) -> registry_pb2.Adapter:
        req = registry_pb2.RegisterAdapterRequest(
            tenant=tenant,
            name=name,
            base_model=base_model,
            uri=uri,
            keep_warm=keep_warm,
            description=description,
        )
        return self._stub.RegisterAdapter(req, metadata=self._metadata, timeout=self._timeout).adapter

    def upload_adapter(
        self,
        directory: Path,
        *,
        tenant: str,
        name: str,
        base_model: str,
        keep_warm: bool = False,
        description: str = "",
        progress: Callable[[int], None] | None = None,
    ) -> registry_pb2.Adapter:
        """Streams adapter_config.json and adapter_model.safetensors from `directory`.

        The directory is checked here first (AdapterDirError names the problem) so a wrong one
        never reaches the registry as a half-sent stream.
        """
        files = check_adapter_dir(directory)
        meta = registry_pb2.UploadAdapterMetadata(
            tenant=tenant, name=name, base_model=base_model, keep_warm=keep_warm, description=description
        )
        return self.upload_files(meta, files, progress=progress)

    def upload_files(
        self,
        meta: registry_pb2.UploadAdapterMetadata,
        files: list[Path],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> registry_pb2.Adapter:
        """progress: called with the bytes of each chunk as it is handed to gRPC."""
        # An exception inside a request iterator reaches the caller as grpc's
        # UNKNOWN "Exception iterating requests!", which says nothing; keep it and raise it instead.
        failed: list[BaseException] = []

        def parts() -> Iterator[registry_pb2.UploadAdapterRequest]:
            yield registry_pb2.UploadAdapterRequest(metadata=meta)
            try:
                for path in files:
                    with path.open("rb") as f:
                        while chunk := f.read(UPLOAD_CHUNK_BYTES):
                            yield registry_pb2.UploadAdapterRequest(
                                chunk=registry_pb2.AdapterFileChunk(file_name=path.name, data=chunk)
                            )
                            if progress is not None:
                                progress(len(chunk))
            except OSError as exc:
                failed.append(exc)
                raise

        try:
            return self._stub.UploadAdapter(parts(), metadata=self._metadata, timeout=self._timeout).adapter
        except grpc.RpcError:
            if failed:
                exc = failed[0]
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                name = getattr(exc, "filename", None) or "a file"
                raise AdapterDirError(
                    f"reading {name} failed during the upload ({detail}); nothing was registered"
                ) from exc
            raise

    def get_adapter(self, reference: str, tenant: str = "") -> registry_pb2.Adapter:
        req = registry_pb2.GetAdapterRequest(tenant=tenant, adapter=reference)
        return self._stub.GetAdapter(req, metadata=self._metadata, timeout=self._timeout).adapter

    def list_adapters(
        self,
        *,
        tenant: str = "",
        base_model: str = "",
        status: common_pb2.AdapterStatus.ValueType = common_pb2.ADAPTER_STATUS_UNSPECIFIED,
        page_size: int = 100,
    ) -> Iterator[registry_pb2.Adapter]:
        """Every matching adapter version, following pages."""
        token = ""
        while True:
            req = registry_pb2.ListAdaptersRequest(
                tenant=tenant, base_model=base_model, status=status, page_size=page_size, page_token=token
            )
            resp = self._stub.ListAdapters(req, metadata=self._metadata, timeout=self._timeout)
            yield from resp.adapters
            token = resp.next_page_token
            if not token:
                return

    def archive_adapter(self, reference: str, tenant: str) -> registry_pb2.Adapter:
        req = registry_pb2.ArchiveAdapterRequest(tenant=tenant, adapter=reference)
        return self._stub.ArchiveAdapter(req, metadata=self._metadata, timeout=self._timeout).adapter
