//! The fleet link over TLS: devices and the fleet reach the broker with `mqtts://`, checking its
//! certificate against the CA file in their configuration; a certificate from another CA is
//! refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
use support::*;

/// Adds `ca_file` to a device configuration written by [`device_config`].
fn with_ca(dir: &std::path::Path, config: &str, ca: &std::path::Path) {
    let path = dir.join(config);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
    std::fs::write(path, text).unwrap();
}

#[test]
fn devices_and_the_fleet_reach_mosquitto_over_tls_and_refuse_a_foreign_certificate() {
    let d = bed("tls-mosquitto");
    let dir = &d.0;
    let (ca, cert, key) = tls_files(dir, "broker");
    let (other_ca, _, _) = tls_files(dir, "other");
    let broker = Mosquitto::start_with(
        dir,
        &format!(
            "allow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let ca_text = ca.to_str().unwrap();
    let fleet = Fleet::launch(dir, &["--broker", &url, "--broker-ca-file", ca_text]);
    assert_eq!(
        fleet.broker, url,
        "the fleet shows the broker as devices reach it"
    );
    let config = device_config(dir, "dev-tls", &url, &[]);
    with_ca(dir, &config, &ca);
    let device = Device::start(dir, &config);
    // A device that trusts another CA never gets through.
    let config = device_config(dir, "dev-other", &url, &[]);
    with_ca(dir, &config, &other_ca);
    let stranger = Device::start(dir, &config);
    online(&fleet, &["dev-tls"]);
    push_and_deploy_digits(
        |args| fleet.cli(dir, args),
        &["--device", "dev-tls"],
        &["dev-tls"],
    );
    assert_eq!(device.digits(), Ok("1.0.0".into()));
    assert!(!fleet.records("telemetry", "dev-tls").is_empty());
    eventually(secs(20), "the stranger's certificate error logged", || {
        stranger
            .proc
            .logs()
            .to_lowercase()
            .contains("certificate")
            .then_some(())
    });
    assert!(
        fleet.device("dev-other").is_none(),
        "connected with a foreign CA"
    );
    // A configuration that asks for TLS with a CA file that is not one is refused at start.
    let config = device_config(dir, "dev-bad", &url, &[]);
    with_ca(dir, &config, &dir.join("trust.toml"));
    let err = fails(dir, &["device", "run", "--config", &config]);
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[test]
fn the_embedded_broker_speaks_tls_to_enrolled_devices_and_closes_plain_mqtt() {
    let d = bed("tls-embedded");
    let dir = &d.0;
    let (ca, cert, key) = tls_files(dir, "fleet");
    let fleet = Fleet::launch(
        dir,
        &[
            "--mqtt-tls-cert",
            cert.to_str().unwrap(),
            "--mqtt-tls-key",
            key.to_str().unwrap(),
            "--require-enrolment",
        ],
    );
    assert!(
        fleet.broker.starts_with("mqtts://127.0.0.1:"),
        "{}",
        fleet.broker
    );
    let section = enroll(&fleet, dir, "dev-e");
    assert!(
        section.contains(&format!("broker = \"{}\"", fleet.broker)),
        "{section}"
    );
    let config = enrolled_config(dir, "dev-e", &section);
    with_ca(dir, &config, &ca);
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-e"]);
    push_and_deploy_digits(
        |args| fleet.cli(dir, args),
        &["--device", "dev-e"],
        &["dev-e"],
    );
    assert_eq!(device.digits(), Ok("1.0.0".into()));
    // Plain MQTT to the TLS port gets no CONNACK, even with a valid login.
    let port: u16 = fleet.broker.rsplit(':').next().unwrap().parse().unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let password = std::fs::read_to_string(dir.join("dev-e.pw")).unwrap();
    let mut plain = std::net::TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    use std::io::{Read, Write};
    plain
        .write_all(&support::raw::connect_packet(
            b"outpost-dev-e",
            Some(("dev-e", password.trim())),
        ))
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert_ne!(answer.first(), Some(&0x20), "a CONNACK in plain MQTT");
    // What it gets is a TLS alert record, then the connection closes.
    assert_eq!(answer.first(), Some(&0x15), "{answer:?}");
    eventually(secs(10), "the plain connection counted", || {
        (metric(&fleet.api, "outpost_fleet_mqtt_malformed_connections_total") > Some(0))
            .then_some(())
    });
    assert_eq!(device.digits(), Ok("1.0.0".into()));
}

#[test]
fn over_https_devices_download_their_bundles_and_operators_need_the_fleet_ca() {
    let d = bed("tls-https");
    let dir = &d.0;
    let (ca, cert, key) = tls_files(dir, "fleet");
    let (cert, key, ca_text) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        ca.to_str().unwrap(),
    );
    let fleet = Fleet::launch(
        dir,
        &[
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--mqtt-tls-cert",
            cert,
            "--mqtt-tls-key",
            key,
            "--require-enrolment",
        ],
    );
    assert!(fleet.api.starts_with("https://127.0.0.1:"), "{}", fleet.api);
    let with_ca = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--fleet-ca-file", ca_text]);
        fleet.cli(dir, &all)
    };
    // Without the fleet's CA an operator command is refused with a certificate error.
    let err = fails(dir, &["fleet", "devices", "--fleet", &fleet.api]);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let pw = "dev-h.pw";
    let section = with_ca(&[
        "fleet",
        "enroll",
        "dev-h",
        "--password-out",
        pw,
        "--device-password-file",
        pw,
    ]);
    let config = enrolled_config(dir, "dev-h", &section);
    let mut text = std::fs::read_to_string(dir.join(&config)).unwrap();
    text.push_str(&format!("ca_file = \"{ca_text}\"\n"));
    std::fs::write(dir.join(&config), text).unwrap();
    let device = Device::start(dir, &config);
    eventually(secs(60), "dev-h online", || {
        let list: serde_json::Value =
            serde_json::from_str(&with_ca(&["fleet", "devices", "--json"])).unwrap();
        list.as_array()?
            .iter()
            .any(|d| d["id"] == "dev-h" && d["online"] == true && !d["reported"].is_null())
            .then_some(())
    });
    push_and_deploy_digits(with_ca, &["--device", "dev-h"], &["dev-h"]);
    assert_eq!(device.digits(), Ok("1.0.0".into()));
    assert!(
        device.proc.logs().contains("url=https://127.0.0.1:"),
        "the bundle did not come over https"
    );
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = fleet.api.replace("https://", "http://");
    let answer = http().get(&format!("{plain}/healthz")).call();
    assert!(
        answer.as_ref().map_or(true, |r| r.status() != 200),
        "plain HTTP was answered: {answer:?}"
    );
}
