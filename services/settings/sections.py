"""The settings, one frozen dataclass per section, each checking its own values (``__post_init__``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from services.imaging.limits import IngestLimits
from services.report.limits import ReportLimits
from services.settings.loader import quoted

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TritonSettings:
    """Where Triton runs: embedded (our child process) unless ``url`` names an external server."""

    url: str = ""  # host:port of an external Triton's gRPC endpoint; empty = start the embedded one
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_repository: Path = PROJECT_ROOT / "triton_models"
    startup_timeout_s: float = 300.0
    stop_grace_s: float = 15.0
    # The Python backend moves tensors through shared memory; masks are 1 MiB each, so start big
    # rather than grow a megabyte at a time.
    python_shm_default_bytes: int = 64 * 1024 * 1024
    python_shm_growth_bytes: int = 64 * 1024 * 1024
    log_verbose: int = 0
    # More tritonserver flags for the embedded server, as one shell-quoted string.
    extra_args: str = ""
    # > 0: the embedded server polls its repository this often (seconds) and loads new model versions as they
    # land (a trained candidate); 0: it loads the repository once, at start (Triton's default).
    repository_poll_s: float = 0.0
    # Tensors through /dev/shm instead of the gRPC message: "auto" (when Triton is on loopback and can
    # map the regions), "on" or "off". The bound is per gateway worker.
    shared_memory: str = "auto"
    shared_memory_max_bytes: int = 256 * 1024 * 1024
    # Tensors from this size go through shared memory: the 1 MiB image and the masks gain; boxes and
    # prompts (bytes) cost less inline than a region write.
    shared_memory_min_tensor_bytes: int = 64 * 1024
    # Per call while checking each model's metadata and config at start-up: a live Triton answers in
    # milliseconds, so this only bounds a hung one (waiting for READY is startup_timeout_s).
    connect_timeout_s: float = 30.0
    # Per readiness call (health polls, start-up polls): short, so a stuck Triton turns health NOT_SERVING
    # within one poll instead of holding the poll loop.
    ready_timeout_s: float = 2.0
    # The classifier's label probe at start-up, the first inference a model sees: it may still be loading
    # its weights, so as generous as connect_timeout_s.
    warmup_timeout_s: float = 30.0
    # gRPC keepalive ping on the gateway's channel to Triton: finds a dead Triton on an idle channel
    # within a minute, well above gRPC's 10 s floor for pings.
    keepalive_time_ms: int = 30_000
    # tritonserver --exit-timeout-secs: how long it drains in-flight requests on SIGTERM; below
    # stop_grace_s so it exits on its own before we kill it.
    exit_timeout_s: int = 5
    # Supervision (services/triton/watch.py, embedded.py). Each gateway worker probes Triton's liveness every
    # probe_interval_s (each probe bounded by probe_timeout_s); probe_failures in a row (or one after a call found
    # it UNAVAILABLE) and calls are answered UNAVAILABLE at once, health NOT_SERVING, until it is back: a dead
    # or hung Triton is noticed within 1.5 s with these. gRPC's reconnect backoff is capped at
    # reconnect_backoff_max_ms (its default grows to 120 s, long after Triton is back).
    probe_interval_s: float = 0.5
    probe_timeout_s: float = 0.5
    probe_failures: int = 2
    reconnect_backoff_max_ms: int = 1000
    # The embedded server is restarted when it exits or has not answered a liveness probe for hung_restart_s
    # (longer than a probe: a Triton that is only slow under load is left alone); the pause before each
    # restart starts at restart_backoff_s and doubles per failed restart up to restart_backoff_max_s.
    hung_restart_s: float = 10.0
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.shared_memory not in {"auto", "on", "off"}:
            raise ValueError(f"triton.shared_memory must be auto, on or off, not {quoted(self.shared_memory)}")

    @property
    def grpc_url(self) -> str:
        return self.url or f"{self.host}:{self.grpc_port}"

    @property
    def embedded(self) -> bool:
        return not self.url


MIB = 1024 * 1024


@dataclass(frozen=True)
class ModelNames:
    """Which Triton model plays each role; point a role at your own model with the same contract."""

    classifier: str = "classifier"
    detector: str = "detector"
    segmenter_text: str = "segmenter_text"
    segmenter_box: str = "segmenter_box"

    def as_dict(self) -> dict[str, str]:
        """Configured roles only: an empty name turns a role off (its RPCs answer UNIMPLEMENTED)."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self) if getattr(self, item.name)}


@dataclass(frozen=True)
class VersionSettings:
    """Which version of each role's Triton model answers, the candidate shadowing it, and when one may be promoted.

    A pin here wins; else ``file`` (written by ``medgate train`` and ``medgate models promote|rollback``, re-read
    by every gateway worker at most every ``reload_interval_s``, so a promotion needs no restart); else the
    highest version Triton had loaded when the gateway connected. A version dropped into the repository never
    answers until it is promoted.
    """

    classifier: str = ""
    detector: str = ""
    segmenter_text: str = ""
    segmenter_box: str = ""
    file: Path = PROJECT_ROOT / "var" / "model_versions.json"
    reload_interval_s: float = 1.0
    # Shadow: this fraction of live classify/detect answers is also computed by the role's candidate version,
    # off the caller's path (the answer is never changed), and the two are compared (metrics, report file).
    shadow_fraction: float = 0.0
    # Shadow calls in flight per worker; a request beyond that is not shadowed (counted as skipped).
    shadow_max_in_flight: int = 2
    shadow_timeout_s: float = 30.0
    shadow_report_file: Path = PROJECT_ROOT / "var" / "shadow" / "comparisons.jsonl"
    # Detections agree when each box scoring >= shadow_min_score on one side has one on the other at IoU >= shadow_iou.
    shadow_iou: float = 0.5
    shadow_min_score: float = 0.5
    # medgate models promote: the candidate's metric (the detector's AP50, the classifier's accuracy; on the reviewed
    # held-out and the phantom held-out cases) may be at most this much below the serving version's on the same
    # cases: about two lesions in a hundred ranked below a false positive, or two answers in a hundred.
    promote_tolerance: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise ValueError(f"versions.shadow_fraction must be within [0, 1], not {self.shadow_fraction}")
        for role in ("classifier", "detector", "segmenter_text", "segmenter_box"):
            pin = getattr(self, role)
            if pin and not (pin.isdigit() and int(pin) > 0):
                raise ValueError(f"versions.{role} must be a positive version number or empty, not {quoted(pin)}")

    def pins(self) -> dict[str, str]:
        """The roles pinned by settings."""
        roles = ("classifier", "detector", "segmenter_text", "segmenter_box")
        return {role: getattr(self, role) for role in roles if getattr(self, role)}


@dataclass(frozen=True)
class GatewaySettings:
    """The inference gateway: address, workers and every per-request limit."""

    host: str = "127.0.0.1"
    port: int = 50051
    # Worker processes sharing the port (SO_REUSEPORT): CPU work scales with cores across connections.
    workers: int = 1
    # Threads per worker for decode and letterbox, so the event loop never blocks on pixels.
    cpu_threads: int = 2
    max_receive_message_bytes: int = 64 * MIB
    max_send_message_bytes: int = 64 * MIB
    # Beyond this many RPCs in flight per worker, gRPC answers RESOURCE_EXHAUSTED at once.
    max_concurrent_rpcs: int = 64
    # A connection older than this is asked to reconnect (GOAWAY), so clients balancing over a dns:/// name
    # find gateway pods the autoscaler added; 0 = never (one machine). In-flight calls get the grace below.
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 600.0
    max_prompts: int = 16
    max_boxes: int = 16
    max_prompt_chars: int = 200
    # Used when the caller sets no deadline; a caller's shorter deadline always wins.
    default_deadline_s: float = 60.0
    triton_retry_backoff_s: float = 0.05
    health_poll_interval_s: float = 2.0
    grace_period_s: float = 5.0
    # Prometheus /metrics (0 = any free port, negative = off); one port for all workers.
    metrics_port: int = 9464
    # glibc allocator: buffers under this size are reused from the heap rather than mapped and
    # unmapped per request (glibc's cap is 32 MiB); 0 leaves glibc's defaults. See tune_allocator.
    malloc_mmap_threshold_bytes: int = 32 * MIB
    malloc_trim_threshold_bytes: int = 256 * MIB
    # "text" for a terminal, "json" (one object a line, with request_id, rpc, code, timings) for a pipeline.
    log_format: str = "text"
    # Items of one InferStream answered at once: enough to overlap decode with Triton, few enough that one
    # stream cannot take every CPU thread and Triton slot from the unary callers.
    stream_in_flight: int = 4
    # The HTTP/JSON face (services/http): MedImageParse's POST /score and POST /v1/classify|detect|segment|analyze,
    # served by each worker beside gRPC with the same TLS settings (plaintext on loopback only). Every call goes
    # through this worker's own gRPC server (auth, validation, limits, deadlines, audit, metrics: one chain).
    # Empty host: gateway.host. A gateway started on gRPC port 0 (tests) takes a free HTTP port too.
    http_enabled: bool = True
    http_host: str = ""
    http_port: int = 8081
    # The largest request body (JSON with base64 images, 4/3 of their bytes); more is 413 before it is parsed.
    http_max_body_bytes: int = 96 * MIB
    # POST /score: items per request (MedImageParse's 256), masks over all items (bounds the answer: about
    # 1.4 MB of JSON per 1024x1024 mask), and items segmented at once (each is one Segment call).
    http_score_max_items: int = 256
    http_score_max_masks: int = 256
    http_score_in_flight: int = 4
    # Per-request cost (services/gateway/cost.py), estimated before any model runs: each unit of model work
    # priced in milliseconds (measured on an idle 2-core CPU: a LiteMedSAM encoder pass ~540 ms, a classifier,
    # detector or text-segmenter pass 10-30 ms, decode and letterbox ~3 ms per megapixel). A request priced over
    # max_request_cost_ms is refused RESOURCE_EXHAUSTED naming both (0 = no limit): by default 16 scattered boxes
    # (17 passes) still fit. One over light_request_cost_ms goes to the box model at Triton priority level 2.
    max_request_cost_ms: float = 15_000.0
    cost_encoder_pass_ms: float = 600.0
    cost_image_pass_ms: float = 20.0
    cost_megapixel_ms: float = 3.0
    light_request_cost_ms: float = 1_000.0
    # By-reference input (ImageInput.reference, services/imaging/ingest/reference.py). Comma-separated allow-lists,
    # empty = that kind of reference refused: directories a file path must resolve under (symlinks and `..`
    # resolved first), and DICOMweb base URLs (scheme, host, port and path prefix must match) a WADO-RS instance
    # URL must start with. A fetch takes at most reference_timeout_s (and never more than the call's deadline)
    # and at most ingest.max_input_bytes; redirects are not followed.
    reference_roots: str = ""
    reference_base_urls: str = ""
    reference_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_request_cost_ms", "cost_encoder_pass_ms", "cost_image_pass_ms", "cost_megapixel_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"gateway.{name} must be 0 or more")
        if self.reference_timeout_s <= 0:
            raise ValueError("gateway.reference_timeout_s must be positive")
        if self.log_format not in {"text", "json"}:
            raise ValueError(f"gateway.log_format must be text or json, not {quoted(self.log_format)}")


@dataclass(frozen=True)
class ReviewSettings:
    """The review service: its address, store, flow definitions, and how the gateway reaches it."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 50052
    # host:port of a review service the gateway routes to; empty = this machine's host:port above.
    url: str = ""
    store_path: Path = PROJECT_ROOT / "var" / "review.sqlite3"
    # PostgreSQL instead of SQLite (postgresql://user@host:5432/db; the password in PGPASSFILE or PGPASSWORD
    # rather than here): what several review replicas share. Empty: SQLite at store_path, one process.
    store_url: str = ""
    flows_file: Path = PROJECT_ROOT / "config" / "flows.toml"
    # How often leases and loops are checked for expiry and pending output.json files are written.
    housekeeping_interval_s: float = 1.0
    # Per StreamCases subscriber; more would let one reviewer hoard cases.
    max_in_flight_per_reviewer: int = 10
    # Routing a case to review must not hold up the inference answer for longer than this.
    route_timeout_s: float = 5.0
    # Cases the gateway could not hand to the review service wait here, sent again every
    # outbox_retry_interval_s; past outbox_max_bytes a case is answered unrouted (and logged).
    outbox_dir: Path = PROJECT_ROOT / "var" / "review-outbox"
    outbox_retry_interval_s: float = 2.0
    outbox_max_bytes: int = 4 * 1024 * MIB
    grace_period_s: float = 5.0
    # The review server's gRPC message limit each way: a case carries its image and masks, like the
    # gateway's requests (gateway.max_receive_message_bytes).
    max_message_bytes: int = 64 * MIB
    # What the gateway may send when it routes one case; the same as the review server accepts.
    route_max_message_bytes: int = 64 * MIB
    # Store threads of the review server: few, because SQLite serialises writers and each commit waits on fsync.
    threads: int = 4
    # SQLite's busy timeout on the store: a writer waits this long for another's lock (fsync-bound commits
    # take milliseconds; a CLI export holding a read is the long case).
    store_busy_timeout_s: float = 30.0
    # Keepalive pings on reviewer streams, which idle for long stretches: a dead peer is found within a minute.
    keepalive_time_ms: int = 30_000
    # The least time between a client's pings on an idle stream the server accepts: gRPC's default (5 min)
    # would answer a client keeping a long reviewer stream alive with GOAWAY (too_many_pings).
    min_ping_interval_ms: int = 10_000
    # The reviewer web page (services/review/web): served by the review service itself, same process and
    # event loop, with the same TLS settings as its gRPC listener (plaintext on loopback only). A review
    # server whose gRPC port is 0 (tests, several replicas in one process) takes a free web port too.
    web_enabled: bool = True
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    # A signed-in page left without a request this long is signed out (automatic logoff, 45 CFR 164.312(a)(2)(iii)).
    web_idle_timeout_s: float = 900.0
    # A page session ends this long after sign-in however active it is (a shift); then sign in again.
    web_session_max_s: float = 12 * 3600.0
    # Sign-in through the hospital's identity provider at security.oidc_issuer (OIDC authorization code
    # with PKCE S256, services/review/web/oidc.py): the page's client id there. Empty: no such sign-in (the
    # embedded default signs in with its development tokens).
    web_oidc_client_id: str = ""
    # A confidential client's secret, read from this file (never from the settings); empty: a public client.
    web_oidc_client_secret_file: str = ""
    # How a confidential client authenticates at the token endpoint: client_secret_basic or client_secret_post.
    web_oidc_client_auth: str = "client_secret_basic"
    # The callback registered at the IdP (https://review.example.org/auth/callback); empty: the address the
    # browser used to reach this listener, plus /auth/callback (set it behind a reverse proxy).
    web_oidc_redirect_uri: str = ""
    # Where the IdP sends the browser after sign-out (register it there); empty: the page's own address.
    web_oidc_post_logout_redirect_uri: str = ""
    # Space-separated scopes asked for; openid is required.
    web_oidc_scopes: str = "openid profile"
    # A sign-in started and not finished within this long is forgotten; at most this many wait at once
    # (each costs memory before anyone has authenticated).
    web_oidc_sign_in_timeout_s: float = 600.0
    web_oidc_max_pending_sign_ins: int = 10_000
    # The page's access token is renewed (refresh-token grant) this long before it expires.
    web_oidc_refresh_before_s: float = 60.0
    # Per request to the identity provider (discovery, token endpoint).
    web_oidc_http_timeout_s: float = 10.0
    # Verified results as DICOM: a DICOM input whose answer was also written as DICOM keeps its source with
    # the case (up to dicom_source_max_bytes; a larger one is reviewed without a verified DICOM result), and
    # when its loop completes the reviewer's VERIFIED SR (and SEG where masks changed) is handed to the DICOM
    # node, which sends it on like its own results. verified_dicom_dir: the node's outbox folder (the
    # node's dicom.outbox_dir; empty = that setting, a node on this host). A result that cannot be built or
    # handed over yet is tried again every verified_dicom_retry_interval_s, never dropped.
    verified_dicom: bool = True
    dicom_source_max_bytes: int = 64 * MIB
    verified_dicom_dir: str = ""
    verified_dicom_retry_interval_s: float = 5.0
    # The verifying organization the verified SR names beside the reviewer (the hospital); empty = "unknown".
    organization: str = ""

    @property
    def target(self) -> str:
        return self.url or f"{self.host}:{self.port}"

    def __post_init__(self) -> None:
        if self.web_oidc_client_auth not in {"client_secret_basic", "client_secret_post"}:
            raise ValueError("review.web_oidc_client_auth must be client_secret_basic or client_secret_post")
        if self.web_oidc_client_id and "openid" not in self.web_oidc_scopes.split():
            raise ValueError("review.web_oidc_scopes must include openid")
        positive = ("web_idle_timeout_s", "web_session_max_s", "web_oidc_sign_in_timeout_s", "web_oidc_http_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"review.{name} must be positive")
        if self.web_oidc_max_pending_sign_ins < 1 or self.web_oidc_refresh_before_s < 0:
            raise ValueError("review.web_oidc_max_pending_sign_ins must be >= 1 and web_oidc_refresh_before_s >= 0")


@dataclass(frozen=True)
class ReportSettings(ReportLimits):
    """The Report service (findings -> impression): its Triton model and per-request limits.

    ``max_findings_chars`` (characters of one findings text; more is RESOURCE_EXHAUSTED),
    ``default_evidence`` and ``max_evidence`` (nearest training reports returned) come from ReportLimits.
    """

    # Serve medgate.v1.Report; off (or an empty model) for a Triton without the impression model.
    enabled: bool = True
    model: str = "impression"  # the Triton model; point it at your own with the same contract
    # Stream items answered at once on one ImpressionStream.
    stream_in_flight: int = 8


@dataclass(frozen=True)
class SecuritySettings:
    """TLS on every listener, bearer tokens with roles on every RPC, and the audit trail.

    The embedded default (``make run``) keeps its development CA, certificates, signing key (JWKS)
    and one token per role in ``credentials_dir``, created once by ``medgate credentials``; a
    hospital points the files at its own CA and ``oidc_issuer`` at its identity provider.
    """

    # TLS: server certificate chain and key (PEM), re-read when they change on disk. Empty = plaintext,
    # allowed only on loopback unless allow_plaintext_on_network says otherwise.
    tls: bool = True
    cert_file: Path = PROJECT_ROOT / "var" / "credentials" / "server.pem"
    key_file: Path = PROJECT_ROOT / "var" / "credentials" / "server.key"
    # Mutual TLS: clients must present a certificate signed by this CA; its subject is the node identity.
    client_ca_file: Path = PROJECT_ROOT / "var" / "credentials" / "ca.pem"
    require_client_cert: bool = False
    # Plaintext on a non-loopback address is refused unless this is set: patient images in clear text.
    allow_plaintext_on_network: bool = False
    # Bearer tokens (JWT) on every RPC but health (and reflection unless reflection_requires_token).
    auth: bool = True
    # Where signing keys come from: an OIDC issuer's discovery document and JWKS (fetched off the event
    # loop, cached, refetched on an unknown key id), else a local JWKS file.
    oidc_issuer: str = ""
    jwks_file: Path = PROJECT_ROOT / "var" / "credentials" / "jwks.json"
    # The issuer and audience every token must carry (the embedded default's own, or the IdP's).
    issuer: str = "https://medgate.invalid/dev"
    audience: str = "medgate"
    # Accepted signature algorithms, comma-separated: asymmetric only, never what the token names.
    algorithms: str = "ES256,RS256"
    # Dotted path of the roles claim in the token (Keycloak's realm roles by default).
    roles_claim: str = "realm_access.roles"
    # exp/nbf/iat tolerance for clocks that disagree.
    clock_skew_s: float = 30.0
    # How long fetched JWKS keys are trusted before they are fetched again.
    jwks_cache_s: float = 300.0
    # An unknown key id fetches the keys again (the IdP rotated), at most this often: a flood of forged
    # key ids cannot turn into a flood of requests to the identity provider.
    jwks_min_refetch_s: float = 10.0
    reflection_requires_token: bool = False
    # The development credentials of the embedded default (CA, certificates, signing key, tokens).
    credentials_dir: Path = PROJECT_ROOT / "var" / "credentials"
    # The token the gateway presents to the review service when it routes a case (role "router").
    router_token_file: Path = PROJECT_ROOT / "var" / "credentials" / "router.token"
    # The audit trail: append-only JSON lines, fsynced; optionally also RFC 5424 to syslog (host:port).
    audit_dir: Path = PROJECT_ROOT / "var" / "audit"
    audit_syslog: str = ""
    # Every audit line is hash-chained (SHA-256); with a key file (>= 32 bytes, mode 0600) the chain is
    # HMAC-SHA256, so whoever can write the audit files but not read this key cannot recompute it.
    audit_hmac_key_file: str = ""

    def __post_init__(self) -> None:
        allowed = {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
        names = self.algorithm_list
        if not names or any(name not in allowed for name in names):
            raise ValueError(f"security.algorithms must list asymmetric JWT algorithms from {sorted(allowed)}")

    @property
    def algorithm_list(self) -> list[str]:
        return [name.strip() for name in self.algorithms.split(",") if name.strip()]


@dataclass(frozen=True)
class DicomSettings:
    """The DICOM node (services/dicom/node): a Storage SCP whose routed instances are analysed and answered as SEG/SR.

    Received instances wait in ``store_dir`` until their series has been quiet for ``quiet_period_s``;
    results wait in ``outbox_dir`` (files and a SQLite ledger) until every destination has them;
    unparseable instances and the ones the gateway refuses go to ``quarantine_dir`` for an operator.
    """

    # Served by `medgate serve` beside the gateway.
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "MEDGATE"
    # Comma-separated calling AE titles allowed to associate; empty = any (on loopback only: a node on
    # another address needs the list).
    allowed_calling_aes: str = ""
    # Comma-separated called AE titles this node answers to; empty = ae_title only.
    allowed_called_aes: str = ""
    # pynetdicom's conservative default: the 11th association at once is rejected (transient, local limit).
    max_associations: int = 10
    # C-STORE answers Out of Resources (A700) when the received files' disk has less than this free.
    min_free_disk_bytes: int = 1024 * MIB
    # Routing rules: which instances are analysed with which tasks and prompts (first match wins).
    routes_file: Path = PROJECT_ROOT / "config" / "dicom_routes.toml"
    # A series is analysed once no instance of it arrived for this long.
    quiet_period_s: float = 5.0
    # Where results go: C-STORE destinations as AE@host:port, comma-separated (MEDGATE_DICOM_DESTINATION).
    destination: str = ""
    # And/or a DICOMweb STOW-RS endpoint (the studies URL's base, e.g. http://pacs:8042/dicom-web).
    stow_url: str = ""
    store_dir: Path = PROJECT_ROOT / "var" / "dicom" / "incoming"
    outbox_dir: Path = PROJECT_ROOT / "var" / "dicom" / "outbox"
    quarantine_dir: Path = PROJECT_ROOT / "var" / "dicom" / "quarantine"
    # Sending (and analysing) again after a transient failure: retry_backoff_s doubled per attempt up to
    # retry_backoff_max_s; after max_attempts a result is moved aside (outbox refused/) for an operator.
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 300.0
    max_attempts: int = 30
    # The gateway the node calls (host:port); empty = gateway.host:gateway.port (loopback for a wildcard).
    gateway_url: str = ""
    # The bearer token the node sends (role inference); empty = security.credentials_dir/inference.token.
    token_file: str = ""
    # One Analyze call's deadline, and how many run at once.
    analyze_timeout_s: float = 120.0
    analyze_workers: int = 2
    # DICOM TLS (the server certificate of security.*; client certificates under security.require_client_cert).
    tls: bool = False
    # pynetdicom's timeouts: association negotiation, DIMSE messages, an idle connection.
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < len(self.ae_title.strip()) <= 16:
            raise ValueError(f"dicom.ae_title must be 1 to 16 characters, not {quoted(self.ae_title)}")
        if self.max_associations < 1 or self.analyze_workers < 1 or self.max_attempts < 1:
            raise ValueError("dicom.max_associations, dicom.analyze_workers and dicom.max_attempts must be at least 1")


@dataclass(frozen=True)
class Settings:
    triton: TritonSettings = field(default_factory=TritonSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    models: ModelNames = field(default_factory=ModelNames)
    versions: VersionSettings = field(default_factory=VersionSettings)
    ingest: IngestLimits = field(default_factory=IngestLimits)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    dicom: DicomSettings = field(default_factory=DicomSettings)
