//! Access to the platform through the real HTTP server and the real CLI: access tokens (create,
//! use, expire, revoke), the admin API, anonymous access, rate limits and request limits.

#[macro_use]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::platform::*;
use common::{CHAT, EMBED};
use serde_json::{json, Value};

#[tokio::test]
async fn token_lifecycle_create_use_expire_revoke() {
    let s = gated();
    // No token, a malformed one, an unknown one: 401 in OpenAI's shape.
    let r = chat_as(s, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"]["code"], "invalid_api_key");
    assert_eq!(
        r.headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
    for bad in [
        "nope",
        "cdl_000000000000_0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let r = call(&s.base, "GET", "/v1/models", Some(bad), None).await;
        assert_eq!(r.status, 401, "{bad}");
    }

    let (id, secret) = create_token(s, "lifecycle", "30d");
    let ok = within!(Duration::from_secs(1), {
        chat_as(s, Some(&secret)).await.status == 200
    });
    assert!(ok < Duration::from_secs(1));

    // The database holds only a hash of the secret. (Read by another process: closing a file
    // descriptor of the database in this one would drop the server's SQLite locks.)
    let secret_part = secret.rsplit('_').next().unwrap();
    let found = Command::new("grep")
        .args(["-rqa", secret_part])
        .arg(&s.data_dir)
        .status()
        .unwrap();
    assert_eq!(
        found.code(),
        Some(1),
        "the secret is stored in {:?}",
        s.data_dir
    );

    let (ok, out, _) = cli(s, &["token", "revoke", &id]);
    assert!(ok && out.contains(&id));
    within!(Duration::from_secs(1), {
        let r = chat_as(s, Some(&secret)).await;
        r.status == 401
            && r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("revoked")
    });
    let (_, list, _) = cli(s, &["token", "list", "--project", "lifecycle"]);
    assert!(list.contains("status=revoked") && !list.contains(secret_part));

    // A short validity period runs out.
    let (_, short) = create_token(s, "lifecycle", "2s");
    accepted(s, &short).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let r = loop {
        let r = call(&s.base, "GET", "/v1/models", Some(&short), None).await;
        if r.status != 200 {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status, 401);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn admin_api_and_self_revocation() {
    let s = gated();
    let body = json!({"project": "admin-made", "ttl": "1h", "name": "svc"});
    assert_eq!(
        call(
            &s.base,
            "POST",
            "/admin/v1/tokens",
            None,
            Some(body.clone())
        )
        .await
        .status,
        401
    );
    assert_eq!(
        call(
            &s.base,
            "POST",
            "/admin/v1/tokens",
            Some("wrong"),
            Some(body.clone())
        )
        .await
        .status,
        401
    );
    let bad_name = json!({"project": "no spaces", "ttl": "1h"});
    let refused = call(
        &s.base,
        "POST",
        "/admin/v1/tokens",
        Some(ADMIN),
        Some(bad_name),
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(
        refused.body["error"]["param"], "project",
        "{}",
        refused.body
    );
    let created = call(&s.base, "POST", "/admin/v1/tokens", Some(ADMIN), Some(body)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let secret = created.body["token"].as_str().unwrap().to_string();
    let id = created.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        call(&s.base, "GET", "/v1/models", Some(&secret), None)
            .await
            .status,
        200
    );

    let listed = call(
        &s.base,
        "GET",
        "/admin/v1/tokens?project=admin-made",
        Some(ADMIN),
        None,
    )
    .await;
    let data = listed.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], id.as_str());
    assert!(!listed.body.to_string().contains(&secret));

    let set = call(
        &s.base,
        "POST",
        "/admin/v1/projects/admin-made",
        Some(ADMIN),
        Some(json!({"rpm": 50})),
    )
    .await;
    assert_eq!(set.body["rpm"], 50, "{}", set.body);

    // The token revokes itself, as the hosted service's endpoint allows.
    let r = call(
        &s.base,
        "POST",
        "/v1/oauth/revoke",
        None,
        Some(json!({"oauth2Token": secret})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["revoked"], true);
    assert_eq!(
        call(&s.base, "GET", "/v1/models", Some(&secret), None)
            .await
            .status,
        401
    );
    let r = call(
        &s.base,
        "POST",
        "/v1/oauth/revoke",
        None,
        Some(json!({"oauth2Token": "unknown"})),
    )
    .await;
    assert_eq!(r.body["revoked"], false);
    let r = call(&s.base, "POST", "/v1/oauth/revoke", None, Some(json!({}))).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "oauth2Token");

    let r = call(
        &s.base,
        "DELETE",
        "/admin/v1/tokens/nope",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn rate_limits_refuse_with_headers_and_recover_after_the_window() {
    let s = gated();
    let (_, token) = create_token(s, "limited", "1h");
    let (ok, out, err) = cli(s, &["project", "set", "limited", "--rpm", "2"]);
    assert!(ok && out.contains("rpm=2"), "{err}");
    accepted(s, &token).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the limit itself is in the snapshot too
    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..3 {
        let r = chat_as(s, Some(&token)).await;
        statuses.push(r.status);
        if r.status == 429 {
            refused = Some(r);
        } else {
            assert_eq!(r.headers["x-ratelimit-limit-requests"], "2");
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
    let r = refused.unwrap();
    assert_eq!(r.body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "0");
    let retry: u64 = r.headers["retry-after"].parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert!(r.headers.contains_key("x-ratelimit-reset-requests"));
    // Embeddings have their own budget.
    let e = call(
        &s.base,
        "POST",
        "/v1/embeddings",
        Some(&token),
        Some(json!({"model": EMBED, "input": "x"})),
    )
    .await;
    assert_eq!(e.status, 200);
    tokio::time::sleep(Duration::from_millis(retry * 1000 + 100)).await;
    let r = chat_as(s, Some(&token)).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // A tokens-per-minute limit: each call reserves its prompt + max_tokens when it starts (so
    // calls cannot overrun the budget together), and is charged what it used when it ends.
    cli(
        s,
        &["project", "set", "limited", "--rpm", "0", "--tpm", "100"],
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let with_max = |m: u64| {
        let mut body = chat_body(CHAT);
        body["max_tokens"] = json!(m);
        body
    };
    let post = |body: Value| {
        let token = token.clone();
        async move {
            call(
                &s.base,
                "POST",
                "/v1/chat/completions",
                Some(&token),
                Some(body),
            )
            .await
        }
    };
    let too_large = post(with_max(200)).await;
    assert_eq!(too_large.status, 429, "{}", too_large.body);
    assert!(too_large.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("too large"));
    let first = post(with_max(8)).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.headers["x-ratelimit-limit-tokens"], "100");
    let mut refused = None;
    for _ in 0..4 {
        let r = post(with_max(8)).await;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("the tokens-per-minute limit refused a call");
    assert_eq!(refused.body["error"]["type"], "tokens");
    assert!(refused.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn anonymous_calls_have_their_own_lower_limit() {
    let s = open();
    // A key that is not a candela token (what OpenAI clients send when they need one) is anonymous.
    for (i, key) in [None, Some("EMPTY"), Some("sk-no-key-required")]
        .into_iter()
        .enumerate()
    {
        let r = chat_as(s, key).await;
        assert_eq!(r.status, 200, "call {i}: {}", r.body);
        assert_eq!(r.headers["x-ratelimit-limit-requests"], "3");
    }
    let r = chat_as(s, None).await;
    assert_eq!(r.status, 429);
    assert!(r.headers["retry-after"].parse::<u64>().unwrap() <= 60);
    // A project's token is not limited by the anonymous budget.
    let (_, token) = create_token(s, "named", "1h");
    within!(Duration::from_secs(1), {
        chat_as(s, Some(&token)).await.status == 200
    });
    // Anonymous usage is its own project.
    let u = call(&s.base, "GET", "/v1/usage", None, None).await;
    assert_eq!(u.body["project"], "anonymous");
    // The refused call is recorded too, as failed.
    assert_eq!(u.body["total"]["requests"], 4);
    assert_eq!(u.body["total"]["failed_requests"], 1);
}

#[tokio::test]
async fn request_limits_413_and_embedding_inputs() {
    let s = gated();
    let (_, token) = create_token(s, "sizes", "1h");
    accepted(s, &token).await;
    let big = "x".repeat(3 * 1024 * 1024);
    let r = call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        Some(&token),
        Some(json!({"model": CHAT, "messages": [{"role": "user", "content": big}]})),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    let inputs: Vec<String> = (0..26).map(|i| format!("text {i}")).collect();
    let r = call(
        &s.base,
        "POST",
        "/v1/embeddings",
        Some(&token),
        Some(json!({"model": EMBED, "input": inputs})),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "input");
    let r = call(
        &s.base,
        "POST",
        "/v1/embeddings",
        Some(&token),
        Some(json!({"model": EMBED, "input": &inputs[..25]})),
    )
    .await;
    assert_eq!(r.status, 200);
}

/// `store: true` keeps a chat completion, streamed or not, with its messages; the project that
/// made it reads, lists (filtered by model and metadata), updates and deletes it, and no other.
#[tokio::test]
async fn stored_chat_completions_are_kept_for_their_project() {
    let s = common::shared();
    let body = json!({"model": CHAT, "temperature": 0, "max_tokens": 8, "store": true,
        "metadata": {"app": "kept"},
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]});
    let (status, made) = common::post(&s.base, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{made}");
    let id = made["id"].as_str().unwrap().to_string();
    let got = call(
        &s.base,
        "GET",
        &format!("/v1/chat/completions/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(got.body["choices"], made["choices"]);
    assert_eq!(got.body["usage"], made["usage"]);
    assert_eq!(got.body["metadata"], json!({"app": "kept"}));
    let path = format!("/v1/chat/completions/{id}/messages");
    let messages = call(&s.base, "GET", &path, None, None).await.body;
    let listed: Vec<(&str, &str)> = messages["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, [("system", "Be brief."), ("user", "Say hi.")]);
    assert_eq!(messages["data"][0]["id"], format!("{id}-0"));
    assert_eq!(messages["data"][1]["content_parts"][0]["text"], "Say hi.");

    // Streamed: kept whole, as the stream added up.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["n"] = json!(2);
    streamed["metadata"] = json!({"app": "streamed"});
    let (events, done) = common::stream(&s.base, "/v1/chat/completions", streamed).await;
    assert!(done);
    let stream_id = events[0]["id"].as_str().unwrap().to_string();
    let mut texts = [String::new(), String::new()];
    for e in &events {
        for c in e["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            texts[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    let path = format!("/v1/chat/completions/{stream_id}");
    let kept = call(&s.base, "GET", &path, None, None).await.body;
    assert_eq!(kept["object"], "chat.completion");
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(kept["choices"][i]["message"]["content"], text.as_str());
    }
    assert_eq!(kept["usage"]["completion_tokens"], 16);

    // Listed oldest first, filtered; metadata replaced; deleted.
    let list = call(
        &s.base,
        "GET",
        "/v1/chat/completions?metadata[app]=kept",
        None,
        None,
    )
    .await;
    let ids: Vec<&Value> = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["id"])
        .collect();
    assert!(
        ids.contains(&&json!(id)) && !ids.contains(&&json!(stream_id)),
        "{}",
        list.body
    );
    let all = call(&s.base, "GET", "/v1/chat/completions?limit=100", None, None).await;
    let ids: Vec<&str> = all.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    let (a, b) = (
        ids.iter().position(|i| *i == id),
        ids.iter().position(|i| *i == stream_id),
    );
    assert!(a < b, "{ids:?}");
    let update = json!({"metadata": {"app": "renamed"}});
    let path = format!("/v1/chat/completions/{id}");
    let (_, updated) = common::post(&s.base, &path, update).await;
    assert_eq!(updated["metadata"], json!({"app": "renamed"}));
    let (_, cleared) = common::post(&s.base, &path, json!({"metadata": null})).await;
    assert_eq!(cleared["metadata"], json!({}));
    let (status, _) = common::post(&s.base, &path, json!({})).await;
    assert_eq!(status, 400);
    let deleted = call(&s.base, "DELETE", &path, None, None).await;
    assert_eq!(
        deleted.body,
        json!({"id": id, "object": "chat.completion.deleted", "deleted": true})
    );
    assert_eq!(call(&s.base, "GET", &path, None, None).await.status, 404);
    // Not kept without `store`.
    let mut plain = body;
    plain["store"] = json!(false);
    let (_, unkept) = common::post(&s.base, "/v1/chat/completions", plain).await;
    let path = format!("/v1/chat/completions/{}", unkept["id"].as_str().unwrap());
    assert_eq!(call(&s.base, "GET", &path, None, None).await.status, 404);

    // Another project's token does not see them.
    let g = gated();
    let (_, mine) = create_token(g, "stored-chat-a", "1h");
    let (_, theirs) = create_token(g, "stored-chat-b", "1h");
    let body = json!({"model": CHAT, "max_tokens": 2, "store": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let made = call(
        &g.base,
        "POST",
        "/v1/chat/completions",
        Some(&mine),
        Some(body),
    )
    .await;
    let path = format!("/v1/chat/completions/{}", made.body["id"].as_str().unwrap());
    assert_eq!(
        call(&g.base, "GET", &path, Some(&mine), None).await.status,
        200
    );
    assert_eq!(
        call(&g.base, "GET", &path, Some(&theirs), None)
            .await
            .status,
        404
    );
    let theirs_list = call(&g.base, "GET", "/v1/chat/completions", Some(&theirs), None).await;
    assert_eq!(theirs_list.body["data"], json!([]));
    // The admin token manages the server and has no stored completions.
    let admin = call(&g.base, "GET", "/v1/chat/completions", Some(ADMIN), None).await;
    assert_eq!(admin.status, 403);
    assert_eq!(
        call(&g.base, "DELETE", &path, Some(&theirs), None)
            .await
            .status,
        404
    );
}
