//! The Entra ID emulator through the whole emulator's router: every grant, both
//! managed-identity protocols, and bearer tokens on ACS and Graph checked by audience.

use axum::body::Body;
use axum::http::Request;
use secrecy::ExposeSecret;
use tower::ServiceExt;

use super::*;
use crate::config::Config;
use crate::emulator::{DEV_CLIENT_CERTIFICATE, Emulator};
use crate::identity::ClientCertificate;

const HOST: &str = "login.example";

fn emulator() -> (Emulator, Config) {
    let config = Config::embedded();
    (Emulator::new(&config.emulator), config)
}

async fn send(emulator: &Emulator, request: Request<Body>) -> (StatusCode, Value) {
    let response = emulator.router().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn token_request(config: &Config, fields: &[(&str, &str)]) -> Request<Body> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    Request::post(format!(
        "/{}/oauth2/v2.0/token",
        config.emulator.graph_tenant_id
    ))
    .header(header::HOST, HOST)
    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
    .body(Body::from(body))
    .unwrap()
}

fn token_url(config: &Config) -> String {
    format!(
        "http://{HOST}/{}/oauth2/v2.0/token",
        config.emulator.graph_tenant_id
    )
}

fn assertion_form<'a>(
    client_id: &'a str,
    assertion: &'a str,
    scope: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("client_id", client_id),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion),
        ("scope", scope),
        ("grant_type", "client_credentials"),
    ]
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    headers
}

#[tokio::test]
async fn a_certificate_assertion_is_verified_against_the_registered_certificate() {
    let (emulator, config) = emulator();
    let client_id = config.emulator.graph_client_id.as_str();
    let certificate =
        ClientCertificate::from_pem(DEV_CLIENT_CERTIFICATE.as_bytes(), "dev").unwrap();
    let assertion = certificate
        .assertion(client_id, &token_url(&config))
        .unwrap();
    let (status, body) = send(
        &emulator,
        token_request(
            &config,
            &assertion_form(client_id, assertion.expose_secret(), ACS_SCOPE),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["access_token"].as_str().unwrap();
    let identity = emulator.identity();
    assert!(identity.check_bearer(&bearer(token), Audience::Acs).is_ok());
    assert!(
        identity
            .check_bearer(&bearer(token), Audience::Graph)
            .is_err()
    );
    assert_eq!(identity.grants()[0].by, "certificate");

    async fn refused_with(
        emulator: &Emulator,
        config: &Config,
        fields: Vec<(&str, String)>,
    ) -> u64 {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = send(emulator, token_request(config, &fields)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"], "invalid_client");
        body["error_codes"][0].as_u64().unwrap()
    }
    let refused = |fields| refused_with(&emulator, &config, fields);
    let form = |assertion: String| {
        assertion_form(client_id, "", GRAPH_SCOPE)
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    if k == "client_assertion" {
                        assertion.clone()
                    } else {
                        v.to_owned()
                    },
                )
            })
            .collect::<Vec<_>>()
    };
    // Signed for another endpoint.
    let elsewhere = certificate
        .assertion(client_id, "https://login.example/other/oauth2/v2.0/token")
        .unwrap();
    assert_eq!(
        refused(form(elsewhere.expose_secret().to_owned())).await,
        700212
    );
    // Claims changed after signing.
    let good = certificate
        .assertion(client_id, &token_url(&config))
        .unwrap();
    let parts: Vec<&str> = good.expose_secret().split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["exp"] = json!(claims["exp"].as_u64().unwrap() + 3600);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    assert_eq!(refused(form(tampered)).await, 700027);
    // Naming another certificate.
    let header =
        URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "x5t": "bm90LXRoaXMtb25l"}).to_string());
    let other = format!("{header}.{}.{}", parts[1], parts[2]);
    assert_eq!(refused(form(other)).await, 700027);
    // Neither a federated token nor a JWT.
    assert_eq!(refused(form("not-a-token".into())).await, 50027);
}

#[tokio::test]
async fn a_federated_token_is_exchanged_until_revoked() {
    let (emulator, config) = emulator();
    let client_id = config.emulator.graph_client_id.as_str();
    let identity = emulator.identity();
    let federated = identity.issue_federated_token(None);
    let (status, body) = send(
        &emulator,
        token_request(
            &config,
            &assertion_form(client_id, &federated.token, GRAPH_SCOPE),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        identity.grants()[0],
        Grant {
            by: "federated",
            audience: Audience::Graph,
            client_id: client_id.to_ascii_lowercase(),
            federated_token: Some(federated.id.clone()),
        }
    );
    // Bound to its app.
    let (status, body) = send(
        &emulator,
        token_request(
            &config,
            &assertion_form("someone-else", &federated.token, GRAPH_SCOPE),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    identity.revoke_federated_token(&federated.token);
    let (status, _) = send(
        &emulator,
        token_request(
            &config,
            &assertion_form(client_id, &federated.token, GRAPH_SCOPE),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A secret and an assertion together are refused.
    let mut both = assertion_form(client_id, "x", GRAPH_SCOPE);
    both.push(("client_secret", "y"));
    let (status, body) = send(&emulator, token_request(&config, &both)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The request log never shows an assertion.
    let log = serde_json::to_string(&emulator.graph().requests()).unwrap();
    assert!(!log.contains(&federated.token), "{log}");
}

fn managed_identity_request(path_and_query: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::get(path_and_query);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn the_app_service_endpoint_wants_its_header_version_and_a_known_identity() {
    let (emulator, config) = emulator();
    let header_value = config.emulator.identity_header.as_str();
    let acs = "resource=https%3A%2F%2Fcommunication.azure.com%2F";
    let path = |query: &str| format!("{APP_SERVICE_PATH}?{query}");
    let (status, body) = send(
        &emulator,
        managed_identity_request(
            &path(&format!("api-version=2019-08-01&{acs}")),
            &[("x-identity-header", header_value)],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["client_id"], "system");
    assert_eq!(body["resource"], "https://communication.azure.com/");
    assert!(body["expires_on"].as_str().unwrap().parse::<u64>().unwrap() > unix_now());
    let token = body["access_token"].as_str().unwrap();
    assert!(
        emulator
            .identity()
            .check_bearer(&bearer(token), Audience::Acs)
            .is_ok()
    );

    let user_assigned = format!(
        "api-version=2019-08-01&{acs}&client_id={}",
        config.emulator.managed_identity_client_id
    );
    let (status, body) = send(
        &emulator,
        managed_identity_request(
            &path(&user_assigned),
            &[("x-identity-header", header_value)],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["client_id"],
        config.emulator.managed_identity_client_id.as_str()
    );

    for (query, headers, want) in [
        (
            format!("api-version=2019-08-01&{acs}"),
            vec![],
            StatusCode::UNAUTHORIZED,
        ),
        (
            format!("api-version=2019-08-01&{acs}"),
            vec![("x-identity-header", "wrong")],
            StatusCode::UNAUTHORIZED,
        ),
        (
            format!("api-version=2017-09-01&{acs}"),
            vec![("x-identity-header", header_value)],
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("api-version=2019-08-01&{acs}&client_id=unknown"),
            vec![("x-identity-header", header_value)],
            StatusCode::BAD_REQUEST,
        ),
        (
            "api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net".to_owned(),
            vec![("x-identity-header", header_value)],
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, body) =
            send(&emulator, managed_identity_request(&path(&query), &headers)).await;
        assert_eq!(status, want, "{query}: {body}");
        assert!(body["error"]["code"].is_string(), "{body}");
    }
    let log = serde_json::to_string(&emulator.identity().requests()).unwrap();
    assert!(!log.contains(header_value), "{log}");
    assert_eq!(emulator.identity().requests().len(), 7);
}

#[tokio::test]
async fn imds_wants_the_metadata_header_and_its_version() {
    let (emulator, _) = emulator();
    let path = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fgraph.microsoft.com";
    let (status, body) = send(
        &emulator,
        managed_identity_request(path, &[("metadata", "true")]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["expires_in"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    let token = body["access_token"].as_str().unwrap();
    assert!(
        emulator
            .identity()
            .check_bearer(&bearer(token), Audience::Graph)
            .is_ok()
    );
    let (status, body) = send(&emulator, managed_identity_request(path, &[])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error_description"],
        "Required metadata header not specified"
    );
    let other_version = path.replace("2018-02-01", "2017-12-01");
    let (status, _) = send(
        &emulator,
        managed_identity_request(&other_version, &[("metadata", "true")]),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn acs_accepts_a_bearer_token_issued_for_it_and_refuses_others() {
    let (emulator, config) = emulator();
    let get_token = |scope: &'static str| {
        let emulator = emulator.clone();
        let config = config.clone();
        async move {
            let fields = [
                ("client_id", config.emulator.graph_client_id.as_str()),
                (
                    "client_secret",
                    config.emulator.graph_client_secret.as_str(),
                ),
                ("scope", scope),
                ("grant_type", "client_credentials"),
            ];
            let (status, body) = send(&emulator, token_request(&config, &fields)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["access_token"].as_str().unwrap().to_owned()
        }
    };
    let remove = |token: &str| {
        Request::post("/calling/callConnections/c1/participants:remove?api-version=2024-09-15")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"participantToRemove":{"rawId":"8:acs:x"}}"#))
            .unwrap()
    };
    let acs = get_token(ACS_SCOPE).await;
    let (status, body) = send(&emulator, remove(&acs)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let graph = get_token(GRAPH_SCOPE).await;
    let (status, body) = send(&emulator, remove(&graph)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("audience"),
        "{body}"
    );
    let (status, _) = send(&emulator, remove("made-up")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    emulator.identity().expire_tokens();
    let (status, body) = send(&emulator, remove(&acs)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "Unauthorized");
}
