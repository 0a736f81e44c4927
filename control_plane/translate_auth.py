"""Who the caller is and which models they may call, as Envoy filters (docs/api-management.md).

On the `gateway` listener, in order:
  1. `header_mutation` removes any client-sent `x-infergate-consumer`;
  2. `api_key_auth` checks a key (`Authorization: Bearer KEY` or `x-api-key: KEY`) and
     sets `x-infergate-consumer` to the key's consumer;
  3. `jwt_authn` verifies a bearer token shaped like a JWT (against the JWKS inlined here)
     and copies the consumer claim into `x-infergate-consumer`;
  4. `rbac` answers 403 on a model whose `access` does not list that consumer.
Which of 2 and 3 runs is decided by a matcher on the `authorization` header, so that each
credential meets exactly one check. Missing or unknown credentials get 401 from 2 or 3.

The keys live in the route configuration (the virtual host's per-filter config), not in
the listener: an edit of the keys file is an RDS update, which applies to the next request
on every connection, where a listener update would drain connections. The JWKS is in the
`jwt_authn` config, which `api_filters` hands to Envoy by ECDS rather than in the listener,
so a JWKS edit drains no connection either. The listener holds the same filters for every
routing file, each disabled until the virtual host (with `consumers`) or a route (`rbac` on a
model with `access`) turns it on; routes that need no credential (public models, the
gateway's own routes) turn the key and JWT checks off again by name.
"""

from __future__ import annotations

import json
from pathlib import Path

from envoy.config.common.mutation_rules.v3.mutation_rules_pb2 import HeaderMutation as Mutation
from envoy.config.core.v3.base_pb2 import DataSource
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.config.rbac.v3.rbac_pb2 import RBAC as Rules
from envoy.config.rbac.v3.rbac_pb2 import Permission, Policy, Principal
from envoy.config.route.v3.route_components_pb2 import (
    DirectResponseAction,
    FilterConfig,
    HeaderMatcher,
    Route,
    RouteMatch,
)
from envoy.extensions.common.matching.v3.extension_matcher_pb2 import ExtensionWithMatcher
from envoy.extensions.filters.common.matcher.action.v3.skip_action_pb2 import SkipFilter
from envoy.extensions.filters.http.api_key_auth.v3.api_key_auth_pb2 import (
    ApiKeyAuth,
    ApiKeyAuthPerRoute,
    Credential,
    Forwarding,
    KeySource,
)
from envoy.extensions.filters.http.header_mutation.v3.header_mutation_pb2 import (
    HeaderMutation,
    HeaderMutationPerRoute,
    Mutations,
)
from envoy.extensions.filters.http.jwt_authn.v3.config_pb2 import (
    JwtAuthentication,
    JwtClaimToHeader,
    JwtHeader,
    JwtProvider,
    JwtRequirement,
    PerRouteConfig,
)
from envoy.extensions.filters.http.rbac.v3.rbac_pb2 import RBAC, RBACPerRoute
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpFilter,
)
from envoy.type.matcher.v3.http_inputs_pb2 import HttpRequestHeaderMatchInput
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message
from xds.core.v3.extension_pb2 import TypedExtensionConfig as XdsTypedExtensionConfig
from xds.type.matcher.v3.matcher_pb2 import Matcher
from xds.type.matcher.v3.regex_pb2 import RegexMatcher as XdsRegexMatcher
from xds.type.matcher.v3.string_pb2 import StringMatcher as XdsStringMatcher

from control_plane.config import Consumers, Jwt, Model

# The authenticated consumer, as telemetry (access_log.CONSUMER_HEADER) and limits read it
# (access_log imports translate, so the name is repeated here; a test holds them equal).
CONSUMER_HEADER = "x-infergate-consumer"
STRIP = "infergate.strip_consumer"
JWT = "envoy.filters.http.jwt_authn"
KEYS = "envoy.filters.http.api_key_auth"
ACCESS = "envoy.filters.http.rbac"
PROVIDER = "infergate"
REQUIREMENT = "consumer"
# A bearer token of three base64url parts separated by dots is a JWT; keys have no dots.
JWT_BEARER = r"^Bearer [A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$"
KEY_SOURCES = [KeySource(header="authorization"), KeySource(header="x-api-key")]
FORWARDING = Forwarding(header=CONSUMER_HEADER, hide_credentials=True)


def _pack(message: Message) -> Any:
    packed = Any()
    packed.Pack(message)
    return packed


def _filter(name: str, config: Message) -> HttpFilter:
    return HttpFilter(name=name, typed_config=_pack(config))


def _filter_unless(name: str, config: Message, jwt: bool) -> HttpFilter:
    """Filter `name` running `config` only when the bearer token is (`jwt`) or is not a JWT."""
    is_jwt = Matcher.MatcherList.Predicate(
        single_predicate=Matcher.MatcherList.Predicate.SinglePredicate(
            input=XdsTypedExtensionConfig(
                name="authorization",
                typed_config=_pack(HttpRequestHeaderMatchInput(header_name="authorization")),
            ),
            value_match=XdsStringMatcher(
                safe_regex=XdsRegexMatcher(google_re2=XdsRegexMatcher.GoogleRE2(), regex=JWT_BEARER)
            ),
        )
    )
    skip_when = Matcher.MatcherList.Predicate(not_matcher=is_jwt) if jwt else is_jwt
    skip = Matcher.OnMatch(
        action=XdsTypedExtensionConfig(name="skip", typed_config=_pack(SkipFilter()))
    )
    wrapped = ExtensionWithMatcher(
        xds_matcher=Matcher(
            matcher_list=Matcher.MatcherList(
                matchers=[Matcher.MatcherList.FieldMatcher(predicate=skip_when, on_match=skip)]
            )
        ),
        extension_config=TypedExtensionConfig(name=name, typed_config=_pack(config)),
    )
    return _filter(name, wrapped)


def _jwt_authentication(jwt: Jwt) -> JwtAuthentication:
    provider = JwtProvider(
        issuer=jwt.issuer,
        audiences=list(jwt.audiences),
        local_jwks=DataSource(inline_string=jwt.jwks),
        from_headers=[JwtHeader(name="authorization", value_prefix="Bearer ")],
        claim_to_headers=[
            JwtClaimToHeader(header_name=CONSUMER_HEADER, claim_name=jwt.consumer_claim)
        ],
    )
    return JwtAuthentication(
        providers={PROVIDER: provider},
        requirement_map={REQUIREMENT: JwtRequirement(provider_name=PROVIDER)},
    )


# The public half of an EC key whose private half was thrown away: nothing verifies.
_NO_KEY = {
    "kty": "EC",
    "crv": "P-256",
    "x": "NuOxSiYl-vITJDk2hI1sBjh_ADxa5Qe3XfGYxj9gbaI",
    "y": "U2J2q_NoLnmNyPbscP9-JcHzD0quwa2TT-_MLaCNzNE",
}
_REFUSE_ALL = Jwt(
    issuer="https://refuse-all.invalid",
    audiences=(),
    jwks_file=Path(),
    jwks=json.dumps({"keys": [_NO_KEY]}),
)


def _jwt_config(jwt: Jwt) -> Any:
    return _filter_unless(JWT, _jwt_authentication(jwt), jwt=True).typed_config


def jwt_fallback() -> Any:
    """The JWT filter's config without a `jwt` block, and for when Envoy has none from the
    control plane (its ECDS default: the config never arrived): every JWT gets 401, other
    credentials skip the filter as always."""
    return _jwt_config(_REFUSE_ALL)


def jwt_config(consumers: Consumers | None) -> Any:
    """The JWT filter's config (by ECDS): the `jwt` block's issuer and JWKS, else none valid."""
    return _jwt_config(consumers.jwt) if consumers and consumers.jwt else jwt_fallback()


def http_filters() -> list[HttpFilter]:
    """Identity and access filters of the gateway listener, before any limit: the same for
    every routing file, each off (`disabled`) until a route or virtual host turns it on with
    its per-filter config. The JWT filter's config is its default: `api_filters` has Envoy
    take the real one (`jwt_config`) by ECDS."""
    keys = ApiKeyAuth(key_sources=KEY_SOURCES, forwarding=FORWARDING)
    # Keys before JWTs: each filter removes the credential it checked, and the JWT check
    # must still find its bearer token after the key check skipped it.
    filters = [
        _filter(STRIP, HeaderMutation()),
        _filter_unless(KEYS, keys, jwt=False),
        HttpFilter(name=JWT, typed_config=jwt_fallback()),
        _filter(ACCESS, RBAC()),
    ]
    for f in filters:
        f.disabled = True
    return filters


def virtual_host_configs(consumers: Consumers) -> dict[str, Any]:
    """Per-filter configs of the gateway's virtual host, which turn on for every route the
    removal of a client-sent consumer header, the keys and the JWT check (without a `jwt`
    block its config refuses every JWT: a JWT-shaped bearer token is no key either)."""
    strip = Mutations(request_mutations=[Mutation(remove=CONSUMER_HEADER)])
    keys = ApiKeyAuthPerRoute(
        credentials=[Credential(key=key, client=name) for name, key in consumers.keys],
        key_sources=KEY_SOURCES,  # a route's config replaces the listener's whole
        forwarding=FORWARDING,
    )
    return {
        STRIP: _pack(HeaderMutationPerRoute(mutations=strip)),
        KEYS: _pack(keys),
        JWT: _pack(PerRouteConfig(requirement_name=REQUIREMENT)),
    }


def open_route_configs() -> dict[str, Any]:
    """Per-filter configs of a route that needs no credential: the key and JWT checks off,
    whatever the virtual host turns on."""
    return {name: _pack(FilterConfig(disabled=True)) for name in (JWT, KEYS)}


def access_route_configs(model: Model) -> dict[str, Any]:
    """Per-filter configs of each of `model`'s routes: open, restricted to the consumers its
    `access` lists, or (without `access`) nothing beyond the virtual host's."""
    if model.access is None:
        return {}
    if model.access.public:
        return open_route_configs()
    principals = [
        Principal(header=HeaderMatcher(name=CONSUMER_HEADER, string_match=StringMatcher(exact=c)))
        for c in model.access.consumers
    ]
    policies = {}
    if principals:
        policies["access"] = Policy(permissions=[Permission(any=True)], principals=principals)
    rules = Rules(action=Rules.ALLOW, policies=policies)
    return {ACCESS: _pack(RBACPerRoute(rbac=RBAC(rules=rules)))}


def not_found_route() -> Route:
    """The last route: a path no model route matched answers 404 with no credential (without
    it such a request would meet the key check with no keys, a misleading 401)."""
    return Route(
        name="gateway/not-found",
        match=RouteMatch(prefix="/"),
        direct_response=DirectResponseAction(status=404),
        typed_per_filter_config=open_route_configs(),
    )
