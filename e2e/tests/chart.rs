//! The Helm chart as real Helm renders it (`charts/infergate/tests/render.py`, Helm v4 through
//! helm-python-sdk), for the default values and each values file of `charts/infergate/ci/`:
//! it lints clean, every object is valid Kubernetes, the pods are hardened, RBAC is least
//! privilege, the values decide what they say, bad values are refused at install time, and
//! every flag the chart passes exists on the binary it runs.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use e2e::built;
use serde_json::Value;

const NAMESPACE: &str = "gw-test";

fn report() -> &'static Value {
    static REPORT: OnceLock<Value> = OnceLock::new();
    REPORT.get_or_init(|| {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/infergate/tests/render.py");
        let output = Command::new("python")
            .arg(script)
            .arg(NAMESPACE)
            .output()
            .expect("python from the set-up virtualenv (scripts/setup.sh)");
        assert!(
            output.status.success(),
            "render.py failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("render.py prints JSON")
    })
}

fn renderings() -> impl Iterator<Item = (&'static String, &'static Vec<Value>)> {
    report()["rendered"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, objects)| (name, objects.as_array().unwrap()))
}

fn objects(values: &str) -> &'static [Value] {
    report()["rendered"][values]
        .as_array()
        .unwrap_or_else(|| panic!("no rendering for {values}"))
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn get<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    find(objects, kind, name).unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container<'a>(objects: &'a [Value], deployment: &str) -> &'a Value {
    &get(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
}

fn args(objects: &[Value], deployment: &str) -> Vec<String> {
    container(objects, deployment)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn helm_lints_every_values_file_without_warnings() {
    for (values, messages) in report()["lint"].as_object().unwrap() {
        let serious: Vec<&Value> = messages
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_u64() >= Some(2))
            .collect();
        assert!(serious.is_empty(), "{values}: {serious:?}");
    }
    assert_eq!(
        renderings().count(),
        3,
        "the defaults, ci/gpu-ingress-values.yaml and ci/pinned-digests-values.yaml"
    );
}

#[test]
fn every_rendered_object_is_valid_kubernetes() {
    let dir = std::env::temp_dir().join(format!("infergate-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (values, objects) in renderings() {
        for (i, object) in objects.iter().enumerate() {
            // ServiceMonitor is the Prometheus operator's type, unknown to the validator; its
            // fields are asserted below.
            if object["kind"] == "ServiceMonitor" {
                continue;
            }
            let path = dir.join(format!("{values}-{i}.json"));
            std::fs::write(&path, object.to_string()).unwrap();
            files.push(path);
        }
    }
    let output = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "--kubernetes-version", "1.33.0"])
        .args(&files)
        .output()
        .expect("kubernetes-validate from the set-up virtualenv");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn every_pod_runs_non_root_read_only_without_privileges_or_capabilities() {
    for (values, objects) in renderings() {
        for deployment in objects.iter().filter(|o| o["kind"] == "Deployment") {
            let name = &deployment["metadata"]["name"];
            let pod = &deployment["spec"]["template"]["spec"];
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"], true,
                "{values} {name}"
            );
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{values} {name}"
            );
            for c in pod["containers"].as_array().unwrap() {
                let security = &c["securityContext"];
                assert_eq!(security["readOnlyRootFilesystem"], true, "{values} {name}");
                assert_eq!(
                    security["allowPrivilegeEscalation"], false,
                    "{values} {name}"
                );
                assert_eq!(security["privileged"], false, "{values} {name}");
                assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
                assert!(security["capabilities"]["add"].is_null());
                assert!(c["resources"]["requests"].is_object(), "{values} {name}");
                assert!(c["livenessProbe"].is_object() && c["readinessProbe"].is_object());
            }
        }
    }
}

/// The rules of every Role and ClusterRole bound to `account`.
fn rules_of(objects: &[Value], account: &str) -> Vec<(String, Option<String>, Value)> {
    let mut found = Vec::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        let bound = binding["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == account);
        if !bound {
            continue;
        }
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap();
        let role = get(
            objects,
            role_kind,
            binding["roleRef"]["name"].as_str().unwrap(),
        );
        let namespace = role["metadata"]["namespace"].as_str().map(str::to_owned);
        for rule in role["rules"].as_array().unwrap() {
            found.push((role_kind.to_owned(), namespace.clone(), rule.clone()));
        }
    }
    found
}

fn grants(rule: &Value, group: &str, resource: &str) -> bool {
    let has = |key: &str, wanted: &str| {
        rule[key]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i == wanted || i == "*"))
    };
    has("apiGroups", group) && has("resources", resource)
}

fn verbs(rule: &Value) -> Vec<&str> {
    rule["verbs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

#[test]
fn the_proxy_reads_secrets_only_in_its_namespace_and_writes_nothing() {
    let objects = objects("default");
    let rules = rules_of(objects, "infergate-proxy");
    assert!(!rules.is_empty());
    for (kind, namespace, rule) in &rules {
        assert!(
            verbs(rule)
                .iter()
                .all(|v| ["get", "list", "watch"].contains(v)),
            "the proxy only reads: {rule}"
        );
        if grants(rule, "", "secrets") {
            assert_eq!(
                (kind.as_str(), namespace.as_deref()),
                ("Role", Some(NAMESPACE)),
                "Secrets only in the release namespace: {rule}"
            );
        }
    }
    assert!(rules.iter().any(|(_, _, r)| grants(r, "", "secrets")));
    assert!(
        rules
            .iter()
            .any(|(_, _, r)| grants(r, "discovery.k8s.io", "endpointslices"))
    );
}

#[test]
fn the_operator_never_lists_or_watches_secrets_outside_the_gateway_namespace() {
    let objects = objects("default");
    let rules = rules_of(objects, "infergate-operator");
    for (kind, namespace, rule) in &rules {
        if grants(rule, "", "secrets") && kind == "ClusterRole" {
            assert_eq!(verbs(rule), ["get", "create"], "cluster-wide: {rule}");
        }
        if grants(rule, "", "secrets") && kind == "Role" {
            assert_eq!(namespace.as_deref(), Some(NAMESPACE));
        }
        assert!(
            !verbs(rule).contains(&"*") && !grants(rule, "*", "*"),
            "no wildcards: {rule}"
        );
    }
}

#[test]
fn every_namespaced_object_lands_in_the_release_namespace() {
    let cluster_scoped = ["ClusterRole", "ClusterRoleBinding"];
    for (values, objects) in renderings() {
        for object in objects {
            let kind = object["kind"].as_str().unwrap();
            let namespace = object["metadata"]["namespace"].as_str();
            if cluster_scoped.contains(&kind) {
                assert_eq!(namespace, None, "{values} {kind}");
            } else {
                assert_eq!(namespace, Some(NAMESPACE), "{values} {kind}");
            }
        }
    }
}

#[test]
fn default_values_install_a_cluster_internal_proxy_with_a_disruption_budget() {
    let objects = objects("default");
    let service = get(objects, "Service", "infergate-proxy");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert!(find(objects, "Ingress", "infergate-proxy").is_none());
    assert!(!objects.iter().any(|o| o["kind"] == "ServiceMonitor"));
    let budget = get(objects, "PodDisruptionBudget", "infergate-proxy");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    let proxy = get(objects, "Deployment", "infergate-proxy");
    assert_eq!(proxy["spec"]["replicas"], 2);
    let pod = &proxy["spec"]["template"]["spec"];
    // The grace period covers the preStop sleep and the longest drain.
    assert_eq!(pod["terminationGracePeriodSeconds"], 600 + 5 + 10);
    assert_eq!(
        pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"],
        5
    );
    assert!(args(objects, "infergate-proxy").contains(&"--grace-period=600".to_owned()));
    assert!(
        !args(objects, "infergate-operator")
            .iter()
            .any(|a| a.starts_with("--runtime-cpu") || a.starts_with("--runtime-memory")),
        "no default runtime resources unless asked"
    );
    assert_eq!(
        container(objects, "infergate-operator")["image"],
        "ghcr.io/infergate/operator:0.1.0"
    );
    assert!(
        args(objects, "infergate-operator")
            .contains(&"--runtime-image=ghcr.io/infergate/runtime:0.1.0".to_owned())
    );
    assert!(
        args(objects, "infergate-operator").contains(&format!("--gateway-namespace={NAMESPACE}"))
    );
    // Published client code calls the proxy's in-cluster address.
    assert!(args(objects, "infergate-operator").contains(&format!(
        "--proxy-url=http://infergate-proxy.{NAMESPACE}.svc"
    )));
    for metrics in ["infergate-operator-metrics", "infergate-proxy-metrics"] {
        let annotations = &get(objects, "Service", metrics)["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{metrics}");
    }
}

#[test]
fn digests_pin_every_image_the_chart_names() {
    let objects = objects("pinned-digests-values.yaml");
    let registry = "127.0.0.1:15000/infergate";
    assert_eq!(
        container(objects, "infergate-operator")["image"],
        format!("{registry}/operator@sha256:{}", "1".repeat(64))
    );
    assert_eq!(
        container(objects, "infergate-proxy")["image"],
        format!("{registry}/proxy@sha256:{}", "2".repeat(64))
    );
    let runtime_image = format!(
        "--runtime-image={registry}/runtime@sha256:{}",
        "3".repeat(64)
    );
    assert!(
        args(objects, "infergate-operator").contains(&runtime_image),
        "{runtime_image}"
    );
    assert!(
        args(objects, "infergate-operator")
            .contains(&"--proxy-url=https://inference.example.com".to_owned())
    );
}

#[test]
fn gpu_and_ingress_values_reach_the_objects_they_describe() {
    let objects = objects("gpu-ingress-values.yaml");
    let ingress = get(objects, "Ingress", "infergate-proxy");
    assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
    assert_eq!(ingress["spec"]["tls"][0]["hosts"][0], "models.example.com");
    assert_eq!(ingress["spec"]["rules"][0]["host"], "models.example.com");
    let path = &ingress["spec"]["rules"][0]["http"]["paths"][0];
    assert_eq!(path["path"], "/models/");
    assert_eq!(path["backend"]["service"]["name"], "infergate-proxy");
    let service = get(objects, "Service", "infergate-proxy");
    assert_eq!(service["spec"]["type"], "NodePort");
    assert_eq!(service["spec"]["ports"][0]["nodePort"], 30080);
    let operator = args(objects, "infergate-operator");
    assert!(operator.contains(&"--watch-namespace=ml-team".to_owned()));
    // Published client code calls the ingress host, over TLS as its Secret says.
    assert!(operator.contains(&"--proxy-url=https://models.example.com".to_owned()));
    assert!(operator.contains(
        &"--runtime-image=registry.example.com/infergate/runtime-cuda:0.1.0-rc1".to_owned()
    ));
    let proxy = args(objects, "infergate-proxy");
    let store = &container(objects, "infergate-proxy")["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "INFERGATE_PROXY_LIMITS_STORE")
        .expect("the limits store's URL")["valueFrom"]["secretKeyRef"];
    assert_eq!(
        (&store["name"], &store["key"]),
        (&"limits-store".into(), &"url".into())
    );
    for flag in [
        "--limits-store-failure=closed",
        "--threads=4",
        "--default-timeout=60",
        "--max-timeout=900",
        "--grace-period=900",
    ] {
        assert!(proxy.contains(&flag.to_owned()), "{flag} in {proxy:?}");
    }
    for flag in [
        "--runtime-cpu=4",
        "--runtime-memory=16Gi",
        "--default-timeout=60",
        "--max-timeout=900",
    ] {
        assert!(
            operator.contains(&flag.to_owned()),
            "{flag} in {operator:?}"
        );
    }
    let proxy_pod = &get(objects, "Deployment", "infergate-proxy")["spec"]["template"]["spec"];
    assert_eq!(proxy_pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(
        proxy_pod["nodeSelector"]["node-role.example.com/gateway"],
        "true"
    );
    assert_eq!(proxy_pod["tolerations"][0]["key"], "dedicated");
    let monitors: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ServiceMonitor")
        .collect();
    assert_eq!(monitors.len(), 2);
    for monitor in monitors {
        assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
        assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
        assert_eq!(
            monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
            "metrics"
        );
    }
}

#[test]
fn the_proxy_alone_mounts_the_signing_keys_and_every_pod_has_a_network_policy() {
    for (values, objects) in renderings() {
        let proxy = get(objects, "Deployment", "infergate-proxy");
        let pod = &proxy["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["secret"]["secretName"] == "infergate-internal-signing-keys")
            .unwrap_or_else(|| panic!("{values}: no signing keys volume"));
        assert_eq!(volume["secret"]["defaultMode"], 0o400, "{values}");
        assert!(
            volume["secret"].get("optional").is_none(),
            "{values}: required"
        );
        let mount = container(objects, "infergate-proxy")["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap()
            .clone();
        assert_eq!(mount["readOnly"], true);
        assert!(
            args(objects, "infergate-proxy").contains(&format!(
                "--internal-signing-keys={}/signing.json",
                mount["mountPath"].as_str().unwrap()
            )),
            "{values}"
        );
        let operator_pod =
            &get(objects, "Deployment", "infergate-operator")["spec"]["template"]["spec"];
        assert!(
            operator_pod.get("volumes").is_none(),
            "{values}: the operator writes the keys through the API, it mounts none"
        );
        // The operator lets the proxy's pods, as the chart labels them, into runtime pods.
        let proxy_labels: Vec<String> = proxy["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
            .collect();
        assert!(
            args(objects, "infergate-operator")
                .contains(&format!("--proxy-pod-labels={}", proxy_labels.join(","))),
            "{values}"
        );
        for name in ["infergate-proxy", "infergate-operator"] {
            let policy = get(objects, "NetworkPolicy", name);
            assert_eq!(
                policy["spec"]["podSelector"]["matchLabels"],
                get(objects, "Deployment", name)["spec"]["selector"]["matchLabels"],
                "{values}"
            );
        }
    }
    let scraped = objects("gpu-ingress-values.yaml");
    let operator = args(scraped, "infergate-operator");
    for flag in [
        "--internal-key-rotation-hours=6",
        "--internal-key-activation-seconds=90",
        "--scraper-namespace-labels=kubernetes.io/metadata.name=monitoring",
        "--scraper-pod-labels=app.kubernetes.io/name=prometheus",
    ] {
        assert!(
            operator.contains(&flag.to_owned()),
            "{flag} in {operator:?}"
        );
    }
    let metrics_rule = &get(scraped, "NetworkPolicy", "infergate-proxy")["spec"]["ingress"][1];
    assert_eq!(
        metrics_rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    let open = &get(objects("default"), "NetworkPolicy", "infergate-proxy")["spec"]["ingress"][1];
    assert!(open.get("from").is_none(), "no scraper set: open to all");
}

#[test]
fn bad_values_are_refused_at_install_time_naming_the_value() {
    let expected = [
        ("unknown top-level key", "'proxi' not allowed"),
        ("zero proxy replicas", "/proxy/replicas"),
        ("unknown service type", "/proxy/service/type"),
        ("node port out of range", "/proxy/service/nodePort"),
        ("pull policy", "/images/pullPolicy"),
        ("image name with a tag", "/runtime/image"),
        ("digest without its algorithm", "/images/digests/proxy"),
        ("memory quantity", "/proxy/resources/limits/memory"),
        ("tls without host", "/proxy/ingress/host"),
        (
            "service monitor interval",
            "/metrics/serviceMonitor/interval",
        ),
        ("zero default timeout", "/timeouts/defaultSeconds"),
        ("runtime memory", "/runtime/defaultResources/memory"),
        (
            "grace shorter than the longest deadline",
            "proxy.gracePeriodSeconds (60) must be at least timeouts.maxSeconds (600)",
        ),
    ];
    let refused = report()["refused"].as_object().unwrap();
    assert_eq!(refused.len(), expected.len());
    for (case, names) in expected {
        let message = refused[case]
            .as_str()
            .unwrap_or_else(|| panic!("values with a {case} were accepted"));
        assert!(message.contains(names), "{case}: {message}");
    }
}

/// `--name` of each `--name=value` argument.
fn flag_names(arguments: &[String]) -> Vec<String> {
    arguments
        .iter()
        .map(|a| a.split('=').next().unwrap().to_owned())
        .collect()
}

#[test]
fn every_flag_the_chart_passes_exists_on_its_binary() {
    for (deployment, binary) in [
        ("infergate-operator", "infergate-operator"),
        ("infergate-proxy", "infergate-proxy"),
    ] {
        let help = Command::new(built(binary))
            .arg("--help")
            .output()
            .expect("the binary runs");
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        for (values, objects) in renderings() {
            for flag in flag_names(&args(objects, deployment)) {
                assert!(
                    help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                    "{values}: {deployment} passes {flag}, which {binary} does not know:\n{help}"
                );
            }
        }
    }
}
