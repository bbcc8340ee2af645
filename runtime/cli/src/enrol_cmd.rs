//! `outpost fleet enroll` and `revoke`: a device's broker credentials, issued and ended.

use std::path::{Path, PathBuf};

use anyhow::Result;
use outpost_proto::rest::Enrolment;

use crate::fleet_cmd::Remote;
use crate::util;

/// Arguments of `outpost fleet enroll`.
#[derive(Debug, clap::Args)]
pub(crate) struct EnrollArgs {
    /// The device id (its broker user name).
    device: String,
    /// Write the password to this file (mode 0600) instead of printing it.
    #[arg(long, value_name = "FILE")]
    password_out: Option<PathBuf>,
    /// The broker URL as devices reach it (default: the one the fleet reports, which is its
    /// listen address: give this when that is 0.0.0.0 or not what devices can reach).
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Where the device keeps its password, for the printed configuration.
    #[arg(
        long,
        default_value = "/etc/outpost/mqtt-password",
        value_name = "PATH"
    )]
    device_password_file: PathBuf,
    /// A tag for the printed configuration (repeat for several).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    #[command(flatten)]
    remote: Remote,
    /// Print the credentials as JSON (the password included).
    #[arg(long)]
    json: bool,
}

/// Issues a device its credentials and prints its `[fleet]` configuration.
pub(crate) fn enroll(args: EnrollArgs) -> Result<()> {
    // Everything that can fail locally is checked before the fleet replaces the device's
    // password: afterwards, the new password must not be lost.
    let broker = args
        .broker
        .as_deref()
        .map(str::parse::<outpost_proto::BrokerUrl>)
        .transpose()?;
    if let Some(path) = &args.password_out {
        util::write_atomic(path, b"", true)?;
    }
    let mut enrolment = args.remote.client()?.enroll(&args.device)?;
    match broker {
        Some(url) => enrolment.broker = url.to_string(),
        None if enrolment.broker.contains("://0.0.0.0:")
            || enrolment.broker.contains("://[::]:") =>
        {
            eprintln!(
                "warning: the fleet reports its broker as {}, which devices cannot reach; give --broker",
                enrolment.broker
            );
        }
        None => {}
    }
    if let Some(path) = &args.password_out
        && let Err(e) =
            util::write_atomic(path, format!("{}\n", enrolment.password).as_bytes(), true)
    {
        // Enrolled already: the old password no longer works, so this one must not be lost.
        eprintln!(
            "error: {e:#}\nthe new password (shown this once):\n{}",
            enrolment.password
        );
        return Err(e);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&enrolment)?);
        return Ok(());
    }
    let status = if enrolment.replaced {
        "enrolled again: its earlier credentials no longer work"
    } else {
        "enrolled"
    };
    eprintln!("{}: {status}", enrolment.device);
    print!(
        "{}",
        fleet_section(&enrolment, &args.device_password_file, &args.tags)
    );
    match &args.password_out {
        Some(path) => eprintln!(
            "password written to {}: copy it to {} on the device (mode 0600)",
            path.display(),
            args.device_password_file.display()
        ),
        None => eprintln!(
            "password (shown this once; put it in {} on the device, mode 0600):\n{}",
            args.device_password_file.display(),
            enrolment.password
        ),
    }
    Ok(())
}

/// Ends a device's credentials.
pub(crate) fn revoke(device: &str, remote: &Remote) -> Result<()> {
    let answer = remote.client()?.revoke(device)?;
    println!("revoked {}: {}", answer.revoked, answer.note);
    Ok(())
}

/// The device configuration's `[fleet]` section for an enrolment.
fn fleet_section(enrolment: &Enrolment, password_file: &Path, tags: &[String]) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""));
    let tags: Vec<String> = tags.iter().map(|t| quote(t)).collect();
    format!(
        "[fleet]\nbroker = {}\nfleet_key = {}\ndevice_id = {}\ntags = [{}]\nusername = {}\npassword_file = {}\n",
        quote(&enrolment.broker),
        quote(&enrolment.fleet_key),
        quote(&enrolment.device),
        tags.join(", "),
        quote(&enrolment.username),
        quote(&password_file.to_string_lossy()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_section_is_a_valid_device_fleet_section() {
        let enrolment = Enrolment {
            device: "dev-1".into(),
            username: "dev-1".into(),
            password: "s3cret-pw".into(),
            broker: "mqtt://10.0.0.5:1883".into(),
            fleet_key: "ab".repeat(32),
            replaced: false,
        };
        let text = fleet_section(&enrolment, Path::new("/etc/outpost/pw"), &["lab".into()]);
        let table: toml::Table = text.parse().unwrap();
        let fleet = table["fleet"].as_table().unwrap();
        assert_eq!(fleet["device_id"].as_str(), Some("dev-1"));
        assert_eq!(fleet["username"].as_str(), Some("dev-1"));
        assert_eq!(fleet["password_file"].as_str(), Some("/etc/outpost/pw"));
        assert_eq!(fleet["tags"].as_array().unwrap().len(), 1);
        assert!(!text.contains("s3cret"), "no password in the configuration");
    }
}
