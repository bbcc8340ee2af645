//! Fleet-wide drift, as real processes on loopback: three devices serve digits with the
//! training baseline in the bundle, each sees its own traffic, and the fleet's PSI per feature
//! equals the PSI of their pooled samples (numpy's, and a plain reference's), per tag too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use serde_json::Value;

mod support;
use support::*;

const BASELINE: &[u8] = include_bytes!("../../models/digits/baseline.json");

/// Observed values per feature.
type Samples = BTreeMap<String, Vec<f64>>;
/// Each request's id and predicted class.
type Answers = Vec<(String, f64)>;

/// What the digits guest observes for one image: the mean of the pixels scaled to 0–1, in f32
/// as the guest sums them.
fn mean_intensity(pixels: &[f64]) -> f64 {
    f64::from(pixels.iter().map(|p| *p as f32 / 16.0).sum::<f32>() / 64.0)
}

/// Sends `images` to the device at `url`; returns the samples the guest observed and each
/// request's id and predicted class.
fn traffic(url: &str, images: &[Vec<f64>]) -> (Samples, Answers) {
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut answered = Vec::new();
    for pixels in images {
        let r = outpost_testkit::post_json(
            &format!("{url}/v2/models/digits/infer"),
            &outpost_testkit::digits_request(pixels),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        let label = outpost_testkit::digits_label(&body) as f64;
        samples
            .entry("mean_intensity".into())
            .or_default()
            .push(mean_intensity(pixels));
        samples
            .entry("predicted_class".into())
            .or_default()
            .push(label);
        answered.push((body["id"].as_str().unwrap().to_owned(), label));
    }
    (samples, answered)
}

fn pool(parts: &[&BTreeMap<String, Vec<f64>>]) -> BTreeMap<String, Vec<f64>> {
    let mut all: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for p in parts {
        for (k, v) in *p {
            all.entry(k.clone()).or_default().extend(v);
        }
    }
    all
}

fn feature<'a>(drift: &'a Value, name: &str) -> &'a Value {
    drift["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == name)
        .unwrap_or_else(|| panic!("no {name} in {drift}"))
}

#[test]
fn fleet_wide_psi_equals_the_psi_of_the_pooled_samples() {
    let d = bed("drift");
    let dir = &d.0;
    digits_with_baseline(dir, "1.1.0");

    let fleet = Fleet::start(dir, None, None);
    let ids = ["dev-a", "dev-b", "dev-c"];
    let tags = [["north"], ["north"], ["south"]];
    let devices: Vec<Device> = ids
        .iter()
        .zip(tags)
        .map(|(id, tags)| Device::start(dir, &device_config(dir, id, &fleet.broker, &tags)))
        .collect();
    online(&fleet, &ids);
    fleet.cli(dir, &["fleet", "push", "digits-1.1.0.opb"]);
    let out = fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@1.1.0",
            "--all",
            "--wait",
            "--timeout",
            "120",
        ],
    );
    for id in ids {
        assert!(out.contains(&format!("{id}: applied")), "{out}");
    }

    // Three kinds of traffic: the test digits as they are, faded to a third of their ink, and
    // thickened; each device gets its own mix.
    let digits: Vec<Vec<f64>> = test_digits().into_iter().map(|(p, _)| p).collect();
    let faint: Vec<Vec<f64>> = digits.iter().map(|p| faded(p)).collect();
    let thick: Vec<Vec<f64>> = digits
        .iter()
        .map(|p| p.iter().map(|v| (v + 7.0).min(16.0)).collect())
        .collect();
    let mixes: [Vec<Vec<f64>>; 3] = [
        digits.iter().cycle().take(40).cloned().collect(),
        digits
            .iter()
            .chain(&faint)
            .cycle()
            .take(30)
            .cloned()
            .collect(),
        thick
            .iter()
            .chain(&digits)
            .cycle()
            .take(25)
            .cloned()
            .collect(),
    ];
    let (samples, answered): (Vec<Samples>, Vec<Answers>) = devices
        .iter()
        .zip(&mixes)
        .map(|(device, images)| traffic(&device.url, images))
        .unzip();
    let total: usize = mixes.iter().map(Vec::len).sum();

    let drift = |query: &str| {
        let (status, v) = get_json(&format!(
            "{}/api/v1/drift?model=digits&version=1.1.0{query}",
            fleet.api
        ));
        assert_eq!(status, 200, "{v}");
        v
    };
    let everywhere = eventually(
        secs(30),
        "every observation in the fleet's telemetry",
        || {
            let v = drift("");
            (feature(&v, "mean_intensity")["n"] == total as u64).then_some(v)
        },
    );
    assert_eq!(everywhere["devices"], 3);
    let baseline = dir.join("baseline.json");
    let all = pool(&[&samples[0], &samples[1], &samples[2]]);
    outpost_testkit::assert_psi_agrees(dir, &baseline, &all, |f| {
        feature(&everywhere, f)["psi"].as_f64().unwrap()
    });
    // The pooled counts are the devices' counts added up, and each device's own PSI is the
    // PSI of its own samples.
    let features = outpost_testkit::baseline_features(&serde_json::from_slice(BASELINE).unwrap());
    for name in ["mean_intensity", "predicted_class"] {
        let f = feature(&everywhere, name);
        let counts: u64 = f["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(counts, total as u64);
        for (id, s) in ids.iter().zip(&samples) {
            let part = f["per_device"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["device"] == *id)
                .unwrap();
            let want = outpost_testkit::reference_psi(&features[name], &s[name]);
            assert!(
                (part["psi"].as_f64().unwrap() - want).abs() < 1e-9,
                "{id} {name}: {part}"
            );
        }
        let mean: f64 = all[name].iter().sum::<f64>() / all[name].len() as f64;
        assert!((f["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{f}");
    }
    // The faded and thickened images moved the mean intensity far from training.
    assert_eq!(
        feature(&everywhere, "mean_intensity")["level"],
        "significant"
    );

    // Per tag: the two northern devices alone. Over a window: the same, as every device
    // started inside it.
    let north = drift("&tag=north");
    assert_eq!(north["devices"], 2);
    outpost_testkit::assert_psi_agrees(dir, &baseline, &pool(&[&samples[0], &samples[1]]), |f| {
        feature(&north, f)["psi"].as_f64().unwrap()
    });
    let windowed = drift("&window=3600");
    for name in ["mean_intensity", "predicted_class"] {
        assert_eq!(
            feature(&windowed, name)["counts"],
            feature(&everywhere, name)["counts"]
        );
    }

    // The CLI shows the same; a version without a baseline and a bad query are clear errors.
    let table = fleet.cli(dir, &["fleet", "drift", "digits@1.1.0", "--tag", "north"]);
    assert!(table.contains("on 2 device(s)"), "{table}");
    let psi = feature(&north, "mean_intensity")["psi"].as_f64().unwrap();
    assert!(table.contains(&format!("{psi:.4}")), "{table}");
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    let (status, v) = get_json(&format!(
        "{}/api/v1/drift?model=digits&version=1.0.0",
        fleet.api
    ));
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no training baseline"),
        "{v}"
    );
    let (status, v) = get_json(&format!("{}/api/v1/drift?model=digits", fleet.api));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("version"), "{v}");
    let (status, _) = get_json(&format!(
        "{}/api/v1/drift?model=digits&version=9.9.9",
        fleet.api
    ));
    assert_eq!(status, 404);

    // Ground truth: every request labelled on its own device; the fleet's accuracy is the
    // accuracy of all predictions against all labels, per tag too.
    let truths: Vec<f64> = test_digits().iter().map(|(_, t)| *t as f64).collect();
    let mut right = [0u64; 3];
    for (i, ((device, images), answered)) in devices.iter().zip(&mixes).zip(&answered).enumerate() {
        let feedback: Vec<Value> = images
            .iter()
            .zip(answered)
            .map(|(pixels, (id, predicted))| {
                let truth = truth_of(&digits, &truths, pixels);
                right[i] += u64::from(truth == *predicted);
                serde_json::json!({"id": id, "truth": truth})
            })
            .collect();
        let r = outpost_testkit::post_json(
            &format!("{}/v2/models/digits/feedback", device.url),
            &serde_json::json!({ "feedback": feedback }),
        );
        assert_eq!(r.json()["accepted"], images.len(), "{}", r.text());
    }
    let quality = eventually(secs(30), "every label in the fleet's telemetry", || {
        let (status, v) = get_json(&format!(
            "{}/api/v1/quality?model=digits&version=1.1.0",
            fleet.api
        ));
        assert_eq!(status, 200, "{v}");
        (v["labels"] == total as u64).then_some(v)
    });
    let offline = right.iter().sum::<u64>() as f64 / total as f64;
    assert!(
        (quality["accuracy"].as_f64().unwrap() - offline).abs() < 1e-12,
        "{quality}"
    );
    assert_eq!(quality["devices"], 3);
    let (_, north) = get_json(&format!(
        "{}/api/v1/quality?model=digits&version=1.1.0&tag=north",
        fleet.api
    ));
    let north_offline = (right[0] + right[1]) as f64 / (mixes[0].len() + mixes[1].len()) as f64;
    assert!(
        (north["accuracy"].as_f64().unwrap() - north_offline).abs() < 1e-12,
        "{north}"
    );
    let table = fleet.cli(dir, &["fleet", "quality", "digits@1.1.0"]);
    assert!(table.contains(&format!("accuracy {offline:.4}")), "{table}");
    eprintln!("fleet accuracy {offline} over {total} labels; north {north_offline}");
}

/// The true digit of a (possibly faded or thickened) test image, by the test digit it came from.
fn truth_of(digits: &[Vec<f64>], truths: &[f64], pixels: &[f64]) -> f64 {
    let thick = |p: &Vec<f64>| p.iter().map(|v| (v + 7.0).min(16.0)).collect::<Vec<f64>>();
    digits
        .iter()
        .zip(truths)
        .find(|(d, _)| d.as_slice() == pixels || faded(d) == pixels || thick(d) == pixels)
        .map(|(_, t)| *t)
        .unwrap()
}
