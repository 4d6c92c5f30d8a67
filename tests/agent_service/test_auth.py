"""Who may do what, over real sockets: tokens, client certificates, rights, tenants and approvers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest

from agent_service import _auth, _limits
from agent_service._auth import AuthConfigError
from agent_service._errors import ApiError
from agent_service.server import serve, shutdown
from agentrun.client import AgentRunClient, tls_credentials
from agentrun.v1 import agent_service_pb2 as pb
from agentrun.v1 import agent_service_pb2_grpc as pb_grpc
from devstack.stack import free_port, wait_until_serving
from shared.conversations import ConversationStore, tenant_conversation
from tests.conftest import AuthStack, Stack, details, server_for, with_auth, with_mutual_tls
from tests.credentials import ALL_RIGHTS, CertificateAuthority, Issuer

METHODS = ["StartRun", "StreamRun", "GetRun", "ListRuns", "CancelRun", "Approve", "ListAgents"]
RIGHT_OF = {
    "StartRun": "runs:start",
    "StreamRun": "runs:read",
    "GetRun": "runs:read",
    "ListRuns": "runs:read",
    "ListAgents": "runs:read",
    "CancelRun": "runs:cancel",
    "Approve": "approvals:decide",
}
# The calls that name a run: another tenant's is NOT_FOUND for them.
RUN_METHODS = ["StreamRun", "GetRun", "CancelRun", "Approve"]


@dataclass
class Pending:
    """A run of tenant acme that waits for an approval."""

    run_id: str
    approval_id: str


async def pending_run(client: AgentRunClient, stack: Stack, agent: str = "patient") -> Pending:
    key = stack.model.script({"tool_calls": [{"name": "echo", "arguments": {"text": "hi"}}]}, {"text": "done"})
    run_id = await client.start_run(agent, key)
    async for event in client.stream_run(run_id):
        if event.HasField("approval_requested"):
            return Pending(run_id, event.approval_requested.approval_id)
    raise AssertionError("the run ended without asking for approval")


def request_of(method: str, run: Pending) -> Message:
    return {
        "StartRun": pb.StartRunRequest(agent="assistant", input="hi"),
        "StreamRun": pb.StreamRunRequest(run_id=run.run_id),
        "GetRun": pb.GetRunRequest(run_id=run.run_id),
        "ListRuns": pb.ListRunsRequest(),
        "CancelRun": pb.CancelRunRequest(run_id=run.run_id, reason="not yours"),
        "Approve": pb.ApproveRequest(
            run_id=run.run_id, approval_id=run.approval_id, decision=pb.APPROVAL_DECISION_DENY
        ),
        "ListAgents": pb.ListAgentsRequest(),
    }[method]


async def call(address: str, method: str, request: Message, token: str | None) -> tuple[grpc.StatusCode, str]:
    """One call with the generated stub, as any client would make it; StreamRun reads its first response only."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        try:
            if method == "StreamRun":
                stream = stub.StreamRun(request, metadata=metadata, timeout=10)  # type: ignore[arg-type]
                await stream.read()
                stream.cancel()
            else:
                await getattr(stub, method)(request, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code(), details(err)
    return grpc.StatusCode.OK, ""


async def statuses(auth: AuthStack, run: Pending, token: str | None, methods: list[str]) -> dict[str, grpc.StatusCode]:
    return {method: (await call(auth.address, method, request_of(method, run), token))[0] for method in methods}


@pytest.fixture
async def acme_run(auth_stack: AuthStack) -> AsyncIterator[Pending]:
    async with auth_stack.client(auth_stack.issuer.token()) as client:
        yield await pending_run(client, auth_stack.stack)


UNAUTHENTICATED_CASES = {
    "no token": (None, "the call has no credentials"),
    "expired": (dict(expires_in=-3600), "the token has expired"),
    "wrong audience": (dict(audience="someone-else"), "the token is not for this service (wrong audience)"),
    "wrong issuer": (dict(issuer="https://elsewhere.test"), "wrong issuer"),
    "bad signature": (dict(key=ec.generate_private_key(ec.SECP256R1())), "(bad signature)"),
    "no tenant": (dict(tenant=None), "the token's 'tenant' claim is missing"),
    "a reserved subject": (dict(subject="agentrun:timeout"), "reserved for the server"),
}


@pytest.mark.parametrize("case", sorted(UNAUTHENTICATED_CASES))
async def test_every_call_without_a_valid_token_is_unauthenticated_saying_why(
    auth_stack: AuthStack, acme_run: Pending, case: str
) -> None:
    claims, problem = UNAUTHENTICATED_CASES[case]
    token = None if claims is None else auth_stack.issuer.token(**claims)

    for method in METHODS:
        code, message = await call(auth_stack.address, method, request_of(method, acme_run), token)
        assert (method, code) == (method, grpc.StatusCode.UNAUTHENTICATED)
        assert problem in message
        assert token is None or token not in message and token.split(".")[1] not in message

    # Nothing was done on the run's behalf: it still waits for the approval.
    async with auth_stack.client(auth_stack.issuer.token()) as client:
        assert (await client.get_run(acme_run.run_id)).state == pb.RUN_STATE_WAITING_FOR_APPROVAL


async def test_a_malformed_authorization_is_unauthenticated(auth_stack: AuthStack) -> None:
    async with grpc.aio.insecure_channel(auth_stack.address) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        for value, problem in [("Basic YWRhOnB3", "must be 'Bearer <token>'"), ("Bearer not.a.jwt", "malformed")]:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ListAgents(pb.ListAgentsRequest(), metadata=(("authorization", value),))
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert problem in details(raised.value)


@pytest.mark.parametrize("method", METHODS)
async def test_a_call_without_its_right_is_permission_denied_and_the_others_pass(
    auth_stack: AuthStack, acme_run: Pending, method: str
) -> None:
    right = RIGHT_OF[method]
    token = auth_stack.issuer.token(scope=" ".join(r for r in ALL_RIGHTS.split() if r != right))

    code, message = await call(auth_stack.address, method, request_of(method, acme_run), token)

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert message == f"'ada' may not call {method}: it needs the right {right!r}"
    only = auth_stack.issuer.token(scope=right)
    assert (await call(auth_stack.address, method, request_of(method, acme_run), only))[0] == grpc.StatusCode.OK


async def test_another_tenants_run_is_not_found_on_every_call_as_a_missing_run_is(
    auth_stack: AuthStack, acme_run: Pending
) -> None:
    other = auth_stack.issuer.token(subject="eve", tenant="globex")
    missing = Pending("run-" + "0" * 32, acme_run.approval_id)

    for method in RUN_METHODS:
        code, message = await call(auth_stack.address, method, request_of(method, acme_run), other)
        missing_code, missing_message = await call(auth_stack.address, method, request_of(method, missing), other)
        assert (method, code) == (method, grpc.StatusCode.NOT_FOUND)
        assert message == missing_message.replace(missing.run_id, acme_run.run_id)
        assert missing_code == grpc.StatusCode.NOT_FOUND

    async with auth_stack.client(auth_stack.issuer.token()) as client:
        run = await client.get_run(acme_run.run_id)
    assert run.state == pb.RUN_STATE_WAITING_FOR_APPROVAL and not run.decided_approvals


async def test_list_runs_shows_only_the_callers_tenant(auth_stack: AuthStack) -> None:
    issuer = auth_stack.issuer
    async with auth_stack.client(issuer.token()) as acme, auth_stack.client(issuer.token(tenant="globex")) as globex:
        acme_run = await acme.start_run("assistant", "hi from acme")
        globex_run = await globex.start_run("assistant", "hi from globex")

        # Temporal's visibility store lists a run a moment after it starts.
        acme_listed = await listed_until(acme, acme_run)
        globex_listed = await listed_until(globex, globex_run)

    assert globex_run not in acme_listed
    assert acme_run not in globex_listed


async def listed_until(client: AgentRunClient, run_id: str) -> set[str]:
    for _ in range(200):
        listed = {run.run_id for run in (await client.list_runs(page_size=100)).runs}
        if run_id in listed:
            return listed
    raise AssertionError(f"{run_id} was never listed")


async def test_the_same_request_id_in_two_tenants_starts_two_runs_and_repeats_find_their_own(
    auth_stack: AuthStack,
) -> None:
    issuer = auth_stack.issuer
    request_id = uuid.uuid4().hex
    async with auth_stack.client(issuer.token()) as acme, auth_stack.client(issuer.token(tenant="globex")) as globex:
        acme_run = await acme.start_run("assistant", "from acme", request_id=request_id)
        # Another request under the same request_id is no ALREADY_EXISTS in another tenant: its ids are its own.
        globex_run = await globex.start_run("assistant", "from globex", request_id=request_id)

        assert acme_run != globex_run
        assert await acme.start_run("assistant", "from acme", request_id=request_id) == acme_run
        assert await globex.start_run("assistant", "from globex", request_id=request_id) == globex_run
        assert (await acme.get_run(acme_run)).run_id == acme_run
        assert (await globex.get_run(globex_run)).run_id == globex_run

    # Without the server's secret the id cannot be worked out: it is no digest of the request_id alone.
    async with AgentRunClient(auth_stack.stack.address) as insecure:
        assert await insecure.start_run("assistant", "from acme", request_id=request_id) not in (acme_run, globex_run)


async def test_a_conversation_id_in_two_tenants_is_two_conversations(auth_stack: AuthStack) -> None:
    issuer = auth_stack.issuer
    stack = auth_stack.stack
    async with auth_stack.client(issuer.token()) as acme, auth_stack.client(issuer.token(tenant="globex")) as globex:
        key = stack.model.script({"tool_calls": [{"name": "echo", "arguments": {"text": "x"}}]}, {"text": "ok"})
        waiting = await acme.start_run("patient", key, conversation_id="c1")

        # Globex's "c1" is its own: acme's active run does not hold it, and its history is globex's alone.
        answer = await globex.run("assistant", "globex speaking", conversation_id="c1")

        assert answer.output.startswith("I am the offline model")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await acme.start_run("assistant", "again", conversation_id="c1")
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert details(raised.value) == (
            f"conversation 'c1' already has an active run {waiting!r}; wait for it to end or cancel it"
        )
    store = ConversationStore(stack.redis, stack.settings.redis_prefix)
    globex_history = await store.messages(tenant_conversation("globex", "c1"))
    globex_turns = [m["content"] for m in globex_history if m["role"] == "user"]
    assert globex_turns == ["globex speaking"]


async def test_the_approver_is_the_tokens_subject_whatever_the_caller_says(
    auth_stack: AuthStack, acme_run: Pending
) -> None:
    async with auth_stack.client(auth_stack.issuer.token(subject="grace")) as client:
        recorded = await client.approve(
            acme_run.run_id, acme_run.approval_id, pb.APPROVAL_DECISION_APPROVE, approver="mallory", reason="fine"
        )
        run = await client.get_run(acme_run.run_id)

    assert (recorded.approver, recorded.reason) == ("grace", "fine")
    assert [(d.approval_id, d.approver) for d in run.decided_approvals] == [(acme_run.approval_id, "grace")]


async def test_an_agent_with_approvers_refuses_anyone_else_with_the_right(auth_stack: AuthStack) -> None:
    issuer = auth_stack.issuer
    async with auth_stack.client(issuer.token(subject="bob")) as bob, auth_stack.client(issuer.token()) as ada:
        run = await pending_run(bob, auth_stack.stack, agent="gated")

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await bob.approve(run.run_id, run.approval_id, pb.APPROVAL_DECISION_APPROVE)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert details(raised.value) == (
            "'bob' may not decide approvals of agent 'gated': only its approvers may (approval.approvers in the "
            "agents file)"
        )

        recorded = await ada.approve(run.run_id, run.approval_id, pb.APPROVAL_DECISION_APPROVE)
        assert recorded.approver == "ada"


async def test_a_sub_agents_approval_is_decided_through_the_root_by_its_tenant_and_its_approvers(
    auth_stack: AuthStack,
) -> None:
    issuer, stack = auth_stack.issuer, auth_stack.stack
    child = stack.model.script({"tool_calls": [{"name": "echo", "arguments": {"text": "hi"}}]}, {"text": "echoed"})
    root = stack.model.script(
        {"tool_calls": [{"name": "delegate_to_gated", "arguments": {"task": f"{child} echo it"}}]}, {"text": "done"}
    )
    async with (
        auth_stack.client(issuer.token(subject="bob")) as bob,
        auth_stack.client(issuer.token()) as ada,
        auth_stack.client(issuer.token(subject="eve", tenant="globex")) as eve,
    ):
        run_id = await bob.start_run("gated_manager", f"{root} go")
        async for event in bob.stream_run(run_id):
            if event.HasField("approval_requested"):
                break
        assert list(event.agent_path) == ["gated_manager", "gated"]
        approval_id = event.approval_requested.approval_id

        # The sub-agent's approvers hold, through the root; another tenant does not learn the run exists.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await bob.approve(run_id, approval_id, pb.APPROVAL_DECISION_APPROVE)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not decide approvals of agent 'gated'" in details(raised.value)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await eve.approve(run_id, approval_id, pb.APPROVAL_DECISION_APPROVE)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND

        recorded = await ada.approve(run_id, approval_id, pb.APPROVAL_DECISION_APPROVE)
        ended = [event async for event in bob.stream_run(run_id, after_sequence=event.sequence)][-1]

    assert recorded.approver == "ada"
    assert ended.run_completed.output == "done"


async def test_a_tenants_run_that_continued_as_new_stays_the_tenants(auth_stack: AuthStack) -> None:
    issuer, stack = auth_stack.issuer, auth_stack.stack
    key = stack.model.script(
        {"tool_calls": [{"name": "calculator", "arguments": {"expression": "1 + 1"}}]},
        {"tool_calls": [{"name": "calculator", "arguments": {"expression": "2 + 2"}}]},
        {"text": "done"},
    )
    async with auth_stack.client(issuer.token()) as acme, auth_stack.client(issuer.token(tenant="globex")) as globex:
        run_id = await acme.start_run("stepwise", key)  # continues as new after every round
        ended = [event async for event in acme.stream_run(run_id)][-1]
        assert ended.run_completed.output == "done"

        assert run_id in await listed_until(acme, run_id)
        assert run_id not in {run.run_id for run in (await globex.list_runs(page_size=100)).runs}
        assert (await acme.get_run(run_id)).state == pb.RUN_STATE_COMPLETED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await globex.get_run(run_id)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_without_authentication_the_header_names_the_approver_but_never_the_servers_own(
    stack: Stack,
) -> None:
    run = await pending_run(stack.client, stack)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.client.approve(run.run_id, run.approval_id, pb.APPROVAL_DECISION_DENY, approver="agentrun:timeout")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(raised.value) == "x-agentrun-approver: names starting with 'agentrun:' are the server's own"

    recorded = await stack.client.approve(run.run_id, run.approval_id, pb.APPROVAL_DECISION_DENY, approver="ada")
    assert recorded.approver == "ada"


async def test_health_and_reflection_stay_open(auth_stack: AuthStack) -> None:
    async with grpc.aio.insecure_channel(auth_stack.address) as channel:
        async with asyncio.timeout(10):
            await wait_until_serving(channel)  # the health check, without credentials
        reflect = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = [reply async for reply in reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
    services = {service.name for reply in replies for service in reply.list_services_response.service}
    assert "agentrun.v1.AgentService" in services


async def test_a_server_without_authentication_refuses_other_than_loopback_unless_insecure(stack: Stack) -> None:
    with pytest.raises(AuthConfigError) as raised:
        await serve(stack.settings, port=0, host="0.0.0.0", temporal=stack.temporal, redis_client=stack.redis)
    assert str(raised.value).startswith("refusing to listen on 0.0.0.0 without authentication: set AGENTRUN_AUTH_JWKS")
    assert "--insecure" in str(raised.value)


async def test_an_authenticating_server_without_tls_refuses_other_than_loopback_unless_insecure(
    stack: Stack, issuer: Issuer
) -> None:
    settings = with_auth(stack.settings, issuer)
    with pytest.raises(AuthConfigError) as raised:
        await serve(settings, port=0, host="0.0.0.0", temporal=stack.temporal, redis_client=stack.redis)
    assert str(raised.value).startswith("refusing to listen on 0.0.0.0 in plaintext with authentication")
    assert "AGENTRUN_TLS_CERT" in str(raised.value) and "--insecure" in str(raised.value)

    server, port = await serve(
        settings, port=0, host="0.0.0.0", temporal=stack.temporal, redis_client=stack.redis, insecure=True
    )
    try:
        async with AgentRunClient(f"127.0.0.1:{port}", token=issuer.token(), retry_budget_seconds=0) as client:
            assert [agent.name for agent in await client.list_agents()][:1] == ["assistant"]
    finally:
        await shutdown(server, grace=0)


async def test_authentication_needs_the_run_id_secret_and_the_issuer(stack: Stack, issuer: Issuer) -> None:
    settings = with_auth(stack.settings, issuer, run_id_secret=None)
    with pytest.raises(AuthConfigError) as raised:
        await serve(settings, port=0, temporal=stack.temporal, redis_client=stack.redis)
    assert str(raised.value).startswith("AGENTRUN_RUN_ID_SECRET is needed with authentication")

    with pytest.raises(AuthConfigError) as raised:
        await serve(replace(settings, auth_issuer=None), port=0, temporal=stack.temporal, redis_client=stack.redis)
    assert str(raised.value) == "AGENTRUN_AUTH_ISSUER and AGENTRUN_AUTH_AUDIENCE are needed with AGENTRUN_AUTH_JWKS"


def test_certificate_rights_are_configured_per_tenant_and_subject() -> None:
    rights = _auth.parse_certificate_rights("acme/approver=approvals:decide; *=runs:read")
    assert rights == {"acme/approver": frozenset({"approvals:decide"}), "*": frozenset({"runs:read"})}

    # A CN alone would grant its rights to that CN in every tenant: refused, saying what to write.
    with pytest.raises(AuthConfigError) as raised:
        _auth.parse_certificate_rights("approver=approvals:decide")
    assert str(raised.value).startswith(
        "AGENTRUN_AUTH_CLIENT_RIGHTS: 'approver=approvals:decide' must be 'tenant/subject=right right ...'"
    )


# Mutual TLS: the client certificate names the caller.


@dataclass
class TlsServer:
    address: str
    ca: CertificateAuthority


@pytest.fixture
async def tls_server(stack: Stack, issuer: Issuer, tmp_path: Path) -> AsyncIterator[TlsServer]:
    ca = CertificateAuthority(tmp_path)
    rights = "globex/reader=runs:read; acme/starter=runs:start runs:read"
    settings = with_mutual_tls(stack.settings, issuer, ca, rights)
    async with server_for(stack, settings) as address:
        yield TlsServer(address.replace("127.0.0.1", "localhost"), ca)


async def test_tokens_travel_over_server_tls_without_client_certificates(
    stack: Stack, issuer: Issuer, tmp_path: Path
) -> None:
    ca = CertificateAuthority(tmp_path)
    server_cert = ca.issue("localhost", dns="localhost")
    tls = dict(tls_cert=str(server_cert.cert_file), tls_key=str(server_cert.key_file))
    async with server_for(stack, with_auth(stack.settings, issuer, **tls)) as address:
        server = address.replace("127.0.0.1", "localhost")
        credentials = tls_credentials(ca_file=str(ca.cert_file))
        async with AgentRunClient(server, credentials=credentials, token=issuer.token(), retry_budget_seconds=0) as ada:
            completed = await ada.run("assistant", "hi over TLS")
        assert completed.output.endswith("You said: hi over TLS")

        # Plaintext to a TLS port gets nowhere.
        async with AgentRunClient(server, token=issuer.token(), retry_budget_seconds=0) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await plain.list_agents()
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def mtls_client(
    server: TlsServer, ca: CertificateAuthority, name: str, org: str | None, token: str | None = None
) -> AgentRunClient:
    issued = ca.issue(name, org)
    credentials = tls_credentials(
        ca_file=str(server.ca.cert_file), cert_file=str(issued.cert_file), key_file=str(issued.key_file)
    )
    return AgentRunClient(server.address, credentials=credentials, token=token, retry_budget_seconds=0)


async def test_a_client_certificate_names_subject_tenant_and_its_configured_rights(
    tls_server: TlsServer, auth_stack: AuthStack
) -> None:
    async with mtls_client(tls_server, tls_server.ca, "starter", "acme") as starter:
        run_id = (await pending_run(starter, auth_stack.stack)).run_id
        # The certificate's O is the tenant: the run is acme's, as for acme's tokens.
        async with auth_stack.client(auth_stack.issuer.token()) as acme:
            assert (await acme.get_run(run_id)).run_id == run_id
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await starter.cancel_run(run_id)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert details(raised.value) == "'starter' may not call CancelRun: it needs the right 'runs:cancel'"

    async with mtls_client(tls_server, tls_server.ca, "reader", "globex") as reader:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await reader.get_run(run_id)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # another tenant's run
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await reader.start_run("assistant", "hi")
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # Rights are a tenant's subject's: the same CN in another tenant gets none of acme's starter's.
    async with mtls_client(tls_server, tls_server.ca, "starter", "globex") as namesake:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await namesake.start_run("assistant", "hi")
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await namesake.list_agents()
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # A subject with no configured rights may do nothing; a token sent along decides instead of the certificate.
    async with mtls_client(tls_server, tls_server.ca, "stranger", "acme") as stranger:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stranger.list_agents()
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    token = auth_stack.issuer.token(subject="grace", scope="runs:cancel")
    async with mtls_client(tls_server, tls_server.ca, "stranger", "acme", token=token) as with_token:
        await with_token.cancel_run(run_id)
    async with auth_stack.client(auth_stack.issuer.token()) as acme:
        assert [event async for event in acme.stream_run(run_id)][-1].HasField("run_cancelled")


async def test_a_certificate_without_its_tenant_or_from_another_ca_gets_nowhere(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    async with mtls_client(tls_server, tls_server.ca, "reader", None) as no_org:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await no_org.list_agents()
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details(raised.value) == "the client certificate's O (its tenant) is missing"

    other_ca = CertificateAuthority(tmp_path, name="someone else's CA")
    async with mtls_client(tls_server, other_ca, "reader", "acme") as impostor:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await impostor.list_agents()
        # The TLS handshake fails: the call never reaches the server.
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    credentials = tls_credentials(ca_file=str(tls_server.ca.cert_file))
    async with AgentRunClient(tls_server.address, credentials=credentials, retry_budget_seconds=0) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await anonymous.list_agents()
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


# Per-principal limits.


def retry_delay(err: grpc.aio.AioRpcError) -> float:
    """The google.rpc.RetryInfo detail of a rich status, in seconds."""
    trailers = dict(err.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert (status.code, status.message) == (err.code().value[0], err.details())
    [detail] = status.details
    info = error_details_pb2.RetryInfo()
    assert detail.Unpack(info)
    return float(info.retry_delay.ToTimedelta().total_seconds())


async def test_a_principal_holding_its_streams_is_refused_another_and_other_principals_go_on(
    stack: Stack, issuer: Issuer
) -> None:
    async with server_for(stack, with_auth(stack.settings, issuer, limit_streams=2)) as address:
        async with AgentRunClient(address, token=issuer.token(subject="setup")) as setup:
            run = await pending_run(setup, stack)
        ada = (("authorization", f"Bearer {issuer.token()}"),)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            held = [stub.StreamRun(pb.StreamRunRequest(run_id=run.run_id), metadata=ada) for _ in range(2)]
            for stream in held:
                await stream.read()  # the stream is open on the server

            third = stub.StreamRun(pb.StreamRunRequest(run_id=run.run_id), metadata=ada)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await third.read()
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details(raised.value) == (
                "'ada' already holds 2 open streams on this server, its limit; close one, or retry in 1 s (or on "
                "another replica)"
            )
            assert retry_delay(raised.value) == 1.0

            # Another principal of the same tenant streams, reads and lists as if ada were not there.
            async with AgentRunClient(address, token=issuer.token(subject="bob")) as bob:
                bob_streams = [bob.stream_run(run.run_id) for _ in range(2)]
                for events in bob_streams:
                    assert (await anext(events)).sequence == 1
                assert (await bob.get_run(run.run_id)).state == pb.RUN_STATE_WAITING_FOR_APPROVAL
                await bob.list_runs()
                for events in bob_streams:
                    await events.aclose()
            # And ada's other calls go on.
            assert (await stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=ada)).run.run_id == run.run_id

            # A stream that ends gives its place back.
            held[0].cancel()
            for _ in range(500):
                again = stub.StreamRun(pb.StreamRunRequest(run_id=run.run_id), metadata=ada)
                try:
                    await again.read()
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    await asyncio.sleep(0.01)
            else:
                raise AssertionError("the cancelled stream never gave its place back")
            for stream in [held[1], again]:
                stream.cancel()


async def test_start_run_is_rate_limited_per_principal_saying_when_to_retry(stack: Stack, issuer: Issuer) -> None:
    settings = with_auth(stack.settings, issuer, limit_starts_per_second=0.01, limit_start_burst=2)
    async with server_for(stack, settings) as address:
        async with (
            AgentRunClient(address, token=issuer.token(), retry_budget_seconds=0) as ada,
            AgentRunClient(address, token=issuer.token(subject="bob"), retry_budget_seconds=0) as bob,
        ):
            for _ in range(2):
                await ada.start_run("assistant", "hi")

            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await ada.start_run("assistant", "one too many")

            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            delay = retry_delay(raised.value)
            assert 99 < delay <= 100  # one token at 0.01 per second
            assert details(raised.value) == (
                f"'ada' starts runs faster than 0.01 per second (bursts of 2); retry in {delay:.3f} s"
            )
            await bob.start_run("assistant", "bob has a bucket of his own")


# Where the keys come from.


async def test_a_rotated_jwks_file_is_read_again_without_a_restart(
    auth_stack: AuthStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_auth, "JWKS_FILE_CHECK_SECONDS", 0)  # looked at on every call, not every few seconds
    rotated = Issuer(tmp_path / "next.json")
    rotated.jwks_file.replace(auth_stack.issuer.jwks_file)  # the operator writes the new key set in its place

    async with auth_stack.client(rotated.token()) as client:
        assert [agent.name for agent in await client.list_agents()][:1] == ["assistant"]
    async with auth_stack.client(auth_stack.issuer.token()) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.list_agents()
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(raised.value) == "the token is signed with a key that this server does not trust"


@dataclass
class JwksEndpoint:
    """What the endpoint answers (``mode``: "keys", or one of BAD_JWKS), from which JWKS file, and how often it
    was asked."""

    url: str
    source: Path
    mode: str = "keys"
    fetches: int = 0
    fetched: asyncio.Event = field(default_factory=asyncio.Event)  # set on every fetch


# Answers of an issuer that is down or broken, none of them a key set.
BAD_JWKS = {
    "html": lambda: web.Response(text="<html>Service Unavailable</html>", content_type="text/html"),
    "no usable keys": lambda: web.json_response({"keys": [{"kty": "nonsense", "kid": "x"}]}),
    "no object": lambda: web.json_response(["keys"]),
    "error 503": lambda: web.Response(status=503, text="down for maintenance"),
}


@pytest.fixture
async def jwks_endpoint(issuer: Issuer) -> AsyncIterator[JwksEndpoint]:
    """The issuer's JWKS served over HTTP on loopback, counting the fetches; it can be made to answer garbage,
    reset the connection halfway through the body, or never answer."""
    endpoint = JwksEndpoint("", issuer.jwks_file)
    never = asyncio.Event()

    async def keys(request: web.Request) -> web.StreamResponse:
        endpoint.fetches += 1
        endpoint.fetched.set()
        if endpoint.mode in BAD_JWKS:
            return BAD_JWKS[endpoint.mode]()
        if endpoint.mode == "hang":
            await never.wait()
        if endpoint.mode == "reset":
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b'{"keys": [')
            assert request.transport is not None
            request.transport.close()
            return response
        return web.Response(text=endpoint.source.read_text(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", keys)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    endpoint.url = f"http://127.0.0.1:{port}/jwks.json"
    yield endpoint
    never.set()  # a hanging answer ends, so that the runner can stop
    await runner.cleanup()


async def test_keys_from_a_jwks_url_are_cached_and_made_up_key_ids_do_not_hammer_it(
    stack: Stack, issuer: Issuer, jwks_endpoint: JwksEndpoint, tmp_path: Path
) -> None:
    async with server_for(stack, with_auth(stack.settings, issuer, auth_jwks=jwks_endpoint.url)) as address:
        async with AgentRunClient(address, token=issuer.token(), retry_budget_seconds=0) as client:
            for _ in range(3):
                await client.list_agents()
        assert jwks_endpoint.fetches == 1

        stranger = Issuer(tmp_path / "stranger.json")
        for _ in range(3):
            async with AgentRunClient(address, token=stranger.token(), retry_budget_seconds=0) as client:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await client.list_agents()
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert details(raised.value) == "the token is signed with a key that this server does not trust"
        # Within JWKS_REFETCH_SECONDS of the last fetch an unknown key id fetches nothing: forged key ids cannot make
        # the server hammer the issuer.
        assert jwks_endpoint.fetches == 1


async def test_an_unreachable_jwks_url_is_unavailable_naming_it(stack: Stack, issuer: Issuer) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    async with server_for(stack, with_auth(stack.settings, issuer, auth_jwks=url)) as address:
        async with AgentRunClient(address, token=issuer.token(), retry_budget_seconds=0) as client:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.list_agents()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(raised.value) == f"the token's keys cannot be fetched from {url}; retry later"


@pytest.mark.parametrize("mode", [*sorted(BAD_JWKS), "reset", "hang"])
async def test_a_jwks_url_answering_no_key_set_is_unavailable_naming_it(
    stack: Stack, issuer: Issuer, jwks_endpoint: JwksEndpoint, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setattr(_auth, "JWKS_FETCH_TIMEOUT_SECONDS", 0.5)
    jwks_endpoint.mode = mode
    async with server_for(stack, with_auth(stack.settings, issuer, auth_jwks=jwks_endpoint.url)) as address:
        async with AgentRunClient(address, token=issuer.token(), retry_budget_seconds=0) as client:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.list_agents()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(raised.value) == f"the token's keys cannot be fetched from {jwks_endpoint.url}; retry later"


async def test_calls_waiting_on_a_jwks_url_that_does_not_answer_share_one_fetch_and_remember_its_failure(
    stack: Stack, issuer: Issuer, jwks_endpoint: JwksEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_auth, "JWKS_FETCH_TIMEOUT_SECONDS", 0.5)
    jwks_endpoint.mode = "hang"
    async with server_for(stack, with_auth(stack.settings, issuer, auth_jwks=jwks_endpoint.url)) as address:
        async with AgentRunClient(address, token=issuer.token(), retry_budget_seconds=0) as client:
            calls = await asyncio.gather(*(client.list_agents() for _ in range(5)), return_exceptions=True)
            assert {err.code() for err in calls if isinstance(err, grpc.aio.AioRpcError)} == {
                grpc.StatusCode.UNAVAILABLE
            }
            assert len(calls) == 5 and all(isinstance(err, grpc.aio.AioRpcError) for err in calls)
            # Within JWKS_REFETCH_SECONDS of the failed fetch, a call is answered at once, without another.
            jwks_endpoint.mode = "keys"
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.list_agents()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert jwks_endpoint.fetches == 1


async def test_keys_from_a_jwks_url_outlive_their_cache_through_an_issuer_that_fails_and_follow_a_rotation(
    stack: Stack, issuer: Issuer, jwks_endpoint: JwksEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Every call finds the keys due for a refresh, and nothing holds a refresh back.
    monkeypatch.setattr(_auth, "JWKS_CACHE_SECONDS", 0)
    monkeypatch.setattr(_auth, "JWKS_REFETCH_SECONDS", 0)
    rotated = Issuer(tmp_path / "rotated.json")
    async with server_for(stack, with_auth(stack.settings, issuer, auth_jwks=jwks_endpoint.url)) as address:
        async with AgentRunClient(address, token=issuer.token(), retry_budget_seconds=0) as client:
            await client.list_agents()
            for mode in [*sorted(BAD_JWKS), "reset"]:
                jwks_endpoint.mode = mode
                jwks_endpoint.fetched.clear()
                await client.list_agents()  # the refresh runs behind the call, which goes on with the keys it has
                await jwks_endpoint.fetched.wait()
                for _ in range(3):
                    await client.list_agents()
        # A key the server has not fetched, while the issuer fails: maybe the issuer's newest, so no "bad key".
        async with AgentRunClient(address, token=rotated.token(), retry_budget_seconds=0) as newcomer:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await newcomer.list_agents()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            # The issuer rotates its key: the new key id makes the server fetch it.
            jwks_endpoint.mode, jwks_endpoint.source = "keys", rotated.jwks_file
            await newcomer.list_agents()


async def test_a_plaintext_jwks_url_elsewhere_than_loopback_is_refused(stack: Stack, issuer: Issuer) -> None:
    settings = with_auth(stack.settings, issuer, auth_jwks="http://issuer.example/jwks.json")
    with pytest.raises(AuthConfigError) as raised:
        await serve(settings, port=0, temporal=stack.temporal, redis_client=stack.redis)
    assert str(raised.value).startswith("AGENTRUN_AUTH_JWKS: a JWKS URL must be https://")


async def test_a_namespace_without_the_tenant_search_attribute_is_refused_at_start(
    stack: Stack, issuer: Issuer
) -> None:
    namespace = f"bare-{uuid.uuid4().hex[:8]}"
    await stack.temporal.workflow_service.register_namespace(
        RegisterNamespaceRequest(namespace=namespace, workflow_execution_retention_period=Duration(seconds=86400))
    )
    settings = with_auth(stack.settings, issuer, temporal_namespace=namespace)

    with pytest.raises(AuthConfigError) as raised:
        await serve(settings, port=0, redis_client=stack.redis)

    assert str(raised.value) == (
        f"the Temporal namespace {namespace!r} lacks the search attribute AgentrunTenant that tenants' runs carry: "
        f"temporal operator search-attribute create --namespace {namespace} --name AgentrunTenant --type Keyword"
    )


def test_rate_limit_buckets_past_the_cap_forget_the_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_limits, "_MAX_BUCKETS", 2)
    limits = _limits.Limits(max_streams=0, starts_per_second=0.001, start_burst=1)
    ada, bob, eve = (_auth.Principal(name, "acme", frozenset()) for name in ["ada", "bob", "eve"])
    limits.take_start(ada)
    limits.take_start(bob)
    with pytest.raises(ApiError):
        limits.take_start(ada)  # ada's bucket is empty, and now the most recently used

    limits.take_start(eve)  # a third bucket: bob's, the least recently used, goes

    with pytest.raises(ApiError):
        limits.take_start(ada)
    limits.take_start(bob)  # forgotten: a full bucket again


async def test_a_jwks_file_is_looked_at_every_few_seconds_not_on_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Issuer(tmp_path / "jwks.json")
    keys = _auth._JwksFile(str(first.jwks_file))
    Issuer(tmp_path / "next.json").jwks_file.replace(first.jwks_file)

    assert (await keys.key(first.kid)).key_id == first.kid  # within JWKS_FILE_CHECK_SECONDS: not looked at

    monkeypatch.setattr(_auth, "JWKS_FILE_CHECK_SECONDS", 0)
    with pytest.raises(ApiError) as raised:
        await keys.key(first.kid)
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_list_runs_quotes_the_values_in_its_query(stack: Stack, issuer: Issuer) -> None:
    # No id or tenant holds a quote, but a task queue may: the query must stay one query.
    settings = with_auth(stack.settings, issuer, task_queue="it's a \\ queue")
    async with server_for(stack, settings) as address:
        async with AgentRunClient(address, token=issuer.token(), retry_budget_seconds=0) as client:
            assert not (await client.list_runs()).runs
