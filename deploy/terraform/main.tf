# The Outpost fleet on an existing Kubernetes cluster, as deploy/kubernetes/base does it: the
# fleet manager (Deployment, data volume, Service, PodDisruptionBudget), Mosquitto unless an
# external broker is given, the Secrets they read, and ingress NetworkPolicies. The provider
# configuration (which cluster) is the caller's: see examples/basic.

locals {
  labels = {
    "app.kubernetes.io/part-of"    = "outpost"
    "app.kubernetes.io/managed-by" = "terraform"
  }
  fleet_labels     = merge(local.labels, { "app.kubernetes.io/name" = "outpost-fleet" })
  mosquitto_labels = merge(local.labels, { "app.kubernetes.io/name" = "mosquitto" })

  mosquitto       = var.broker == ""
  broker          = local.mosquitto ? "mqtt://mosquitto:1883" : var.broker
  api_token       = var.api_token != "" ? var.api_token : random_password.api_token.result
  broker_password = var.broker_password != "" ? var.broker_password : random_password.broker.result
  service_address = "outpost-fleet.${var.namespace}.svc:7878"
  public_url      = var.public_url != "" ? var.public_url : "http://${local.service_address}"

  fleet_security_context = {
    run_as_user  = 65532
    run_as_group = 65532
  }
  # The ACL of docs/mosquitto/outpost.acl.
  mosquitto_acl = file("${path.module}/../../docs/mosquitto/outpost.acl")
}

resource "random_password" "api_token" {
  length  = 48
  special = false
}

resource "random_password" "broker" {
  length  = 32
  special = false
}

resource "random_id" "share_group" {
  byte_length = 12
}

resource "kubernetes_namespace_v1" "outpost" {
  metadata {
    name = var.namespace
    labels = merge(local.labels, {
      "pod-security.kubernetes.io/enforce" = "restricted"
    })
  }
}

# --- the fleet manager ---------------------------------------------------------------------------

resource "kubernetes_secret_v1" "fleet" {
  metadata {
    name      = "outpost-fleet"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.fleet_labels
  }
  data = merge(
    {
      "api-token"       = local.api_token
      "broker-password" = local.broker_password
      "share-group"     = random_id.share_group.hex
    },
    var.database_url != "" ? { "database-url" = var.database_url } : {},
  )
}

resource "kubernetes_service_account_v1" "fleet" {
  metadata {
    name      = "outpost-fleet"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.fleet_labels
  }
  automount_service_account_token = false
}

resource "kubernetes_persistent_volume_claim_v1" "fleet" {
  metadata {
    name      = "outpost-fleet-data"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.fleet_labels
  }
  spec {
    # With the PostgreSQL store, the volume holds the artifacts only; several replicas then
    # need a ReadWriteMany class.
    access_modes       = [var.replicas > 1 ? "ReadWriteMany" : "ReadWriteOnce"]
    storage_class_name = var.storage_class != "" ? var.storage_class : null
    resources {
      requests = {
        storage = var.storage_size
      }
    }
  }
  wait_until_bound = false
}

resource "kubernetes_deployment_v1" "fleet" {
  #checkov:skip=CKV_K8S_43:The image is a variable; give it by digest (image = "REGISTRY/outpost-fleet@sha256:...") to pin it
  #checkov:skip=CKV_K8S_15:Release tags are never moved; IfNotPresent lets an edge cluster run images imported without a registry
  metadata {
    name      = "outpost-fleet"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = merge(local.fleet_labels, { "app.kubernetes.io/component" = "fleet-manager" })
  }

  spec {
    replicas = var.replicas
    strategy {
      type = var.replicas > 1 ? "RollingUpdate" : "Recreate"
    }
    selector {
      match_labels = { "app.kubernetes.io/name" = "outpost-fleet" }
    }

    template {
      metadata {
        labels = merge(local.fleet_labels, { "app.kubernetes.io/component" = "fleet-manager" })
        annotations = {
          "prometheus.io/scrape" = "true"
          "prometheus.io/port"   = "7878"
          "prometheus.io/path"   = "/metrics"
        }
      }

      spec {
        service_account_name             = kubernetes_service_account_v1.fleet.metadata[0].name
        automount_service_account_token  = false
        termination_grace_period_seconds = 30

        security_context {
          run_as_non_root        = true
          run_as_user            = local.fleet_security_context.run_as_user
          run_as_group           = local.fleet_security_context.run_as_group
          fs_group               = 65532
          fs_group_change_policy = "OnRootMismatch"
          seccomp_profile {
            type = "RuntimeDefault"
          }
        }

        container {
          name              = "fleet"
          image             = var.image
          image_pull_policy = "IfNotPresent"
          args = concat([
            "fleet", "serve",
            "--data-dir=/var/lib/outpost-fleet",
            "--listen=0.0.0.0:7878",
            "--token-file=/run/secrets/outpost/api-token",
            "--broker=${local.broker}",
            "--broker-username=${var.broker_username}",
            "--broker-password-file=/run/secrets/outpost/broker-password",
            "--mqtt-share-group=$(OUTPOST_SHARE_GROUP)",
            "--public-url=${local.public_url}",
            "--require-enrolment",
          ], var.replicas > 1 ? ["--replica=$(OUTPOST_POD_NAME)"] : ["--replica=primary"])

          env {
            name  = "OUTPOST_LOG"
            value = "info"
          }
          # Replicas sharing the data volume each need their own name (their MQTT client id).
          env {
            name = "OUTPOST_POD_NAME"
            value_from {
              field_ref {
                field_path = "metadata.name"
              }
            }
          }
          env {
            name = "OUTPOST_SHARE_GROUP"
            value_from {
              secret_key_ref {
                name = kubernetes_secret_v1.fleet.metadata[0].name
                key  = "share-group"
              }
            }
          }
          env {
            name = "OUTPOST_DATABASE_URL"
            value_from {
              secret_key_ref {
                name     = kubernetes_secret_v1.fleet.metadata[0].name
                key      = "database-url"
                optional = true
              }
            }
          }
          # Where the other replicas on the database reach this one: a replica without the
          # publishing role forwards pushes and deployments to the one with it.
          env {
            name = "OUTPOST_POD_IP"
            value_from {
              field_ref {
                field_path = "status.podIP"
              }
            }
          }
          env {
            name  = "OUTPOST_ADVERTISE_URL"
            value = "http://$(OUTPOST_POD_IP):7878"
          }

          port {
            name           = "api"
            container_port = 7878
            protocol       = "TCP"
          }

          startup_probe {
            http_get {
              path = "/healthz"
              port = "api"
            }
            period_seconds    = 2
            failure_threshold = 60
          }
          liveness_probe {
            http_get {
              path = "/healthz"
              port = "api"
            }
            period_seconds    = 10
            timeout_seconds   = 3
            failure_threshold = 3
          }
          readiness_probe {
            http_get {
              path = "/readyz"
              port = "api"
            }
            period_seconds    = 5
            timeout_seconds   = 3
            failure_threshold = 2
          }

          resources {
            requests = {
              cpu    = var.resources.requests_cpu
              memory = var.resources.requests_memory
            }
            limits = {
              cpu    = var.resources.limits_cpu
              memory = var.resources.limits_memory
            }
          }

          security_context {
            allow_privilege_escalation = false
            read_only_root_filesystem  = true
            privileged                 = false
            run_as_non_root            = true
            run_as_user                = local.fleet_security_context.run_as_user
            run_as_group               = local.fleet_security_context.run_as_group
            capabilities {
              drop = ["ALL"]
            }
            seccomp_profile {
              type = "RuntimeDefault"
            }
          }

          volume_mount {
            name       = "data"
            mount_path = "/var/lib/outpost-fleet"
          }
          volume_mount {
            name       = "secrets"
            mount_path = "/run/secrets/outpost"
            read_only  = true
          }
        }

        volume {
          name = "data"
          persistent_volume_claim {
            claim_name = kubernetes_persistent_volume_claim_v1.fleet.metadata[0].name
          }
        }
        volume {
          name = "secrets"
          secret {
            secret_name  = kubernetes_secret_v1.fleet.metadata[0].name
            default_mode = "0440"
            items {
              key  = "api-token"
              path = "api-token"
            }
            items {
              key  = "broker-password"
              path = "broker-password"
            }
          }
        }
      }
    }
  }

  lifecycle {
    precondition {
      condition     = var.replicas == 1 || var.database_url != ""
      error_message = "replicas > 1 needs database_url: the embedded store is a single-writer database."
    }
    precondition {
      condition     = !local.mosquitto || var.mosquitto_passwd != ""
      error_message = "with no external broker, mosquitto_passwd (the broker's password file) is required."
    }
  }
}

resource "kubernetes_service_v1" "fleet" {
  metadata {
    name      = "outpost-fleet"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.fleet_labels
  }
  spec {
    type     = var.service_type
    selector = { "app.kubernetes.io/name" = "outpost-fleet" }
    port {
      name        = "api"
      port        = 7878
      target_port = "api"
      protocol    = "TCP"
    }
  }
  wait_for_load_balancer = var.service_type == "LoadBalancer"
}

resource "kubernetes_pod_disruption_budget_v1" "fleet" {
  metadata {
    name      = "outpost-fleet"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.fleet_labels
  }
  spec {
    max_unavailable = "1"
    selector {
      match_labels = { "app.kubernetes.io/name" = "outpost-fleet" }
    }
  }
}

# --- Mosquitto, unless an external broker is given ---------------------------------------------

resource "kubernetes_secret_v1" "mosquitto_passwd" {
  count = local.mosquitto ? 1 : 0
  metadata {
    name      = "mosquitto-passwd"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.mosquitto_labels
  }
  data = {
    passwd = var.mosquitto_passwd
  }
}

resource "kubernetes_config_map_v1" "mosquitto" {
  count = local.mosquitto ? 1 : 0
  metadata {
    name      = "mosquitto-config"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.mosquitto_labels
  }
  data = {
    "mosquitto.conf" = <<-CONF
      listener 1883
      allow_anonymous false
      password_file /mosquitto/secrets/passwd
      acl_file /mosquitto/config/outpost.acl
      use_username_as_clientid true
      # Many devices: as docs/mosquitto/outpost.conf (a backlog per subscriber, the fleet's window).
      max_queued_messages 100000
      max_inflight_messages 100
      persistence true
      persistence_location /mosquitto/data/
      autosave_interval 60
      log_dest stdout
      log_type error
      log_type warning
      log_type notice
    CONF
    "outpost.acl"    = local.mosquitto_acl
  }
}

resource "kubernetes_service_account_v1" "mosquitto" {
  count = local.mosquitto ? 1 : 0
  metadata {
    name      = "mosquitto"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.mosquitto_labels
  }
  automount_service_account_token = false
}

resource "kubernetes_persistent_volume_claim_v1" "mosquitto" {
  count = local.mosquitto ? 1 : 0
  metadata {
    name      = "mosquitto-data"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.mosquitto_labels
  }
  spec {
    access_modes       = ["ReadWriteOnce"]
    storage_class_name = var.storage_class != "" ? var.storage_class : null
    resources {
      requests = {
        storage = "1Gi"
      }
    }
  }
  wait_until_bound = false
}

resource "kubernetes_deployment_v1" "mosquitto" {
  #checkov:skip=CKV_K8S_43:The image is a variable; give it by digest to pin it
  #checkov:skip=CKV_K8S_15:Release tags are never moved; IfNotPresent lets an edge cluster run images imported without a registry
  count = local.mosquitto ? 1 : 0
  metadata {
    name      = "mosquitto"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = merge(local.mosquitto_labels, { "app.kubernetes.io/component" = "broker" })
  }

  spec {
    # Mosquitto does not cluster: one broker, on a ReadWriteOnce volume.
    replicas = 1
    strategy {
      type = "Recreate"
    }
    selector {
      match_labels = { "app.kubernetes.io/name" = "mosquitto" }
    }

    template {
      metadata {
        labels = merge(local.mosquitto_labels, { "app.kubernetes.io/component" = "broker" })
        annotations = {
          # Restart the broker when its configuration or password file changes.
          "outpost.dev/config-sha256" = sha256(join("\n", [
            kubernetes_config_map_v1.mosquitto[0].data["mosquitto.conf"],
            local.mosquitto_acl,
            sha256(var.mosquitto_passwd),
          ]))
        }
      }

      spec {
        service_account_name            = kubernetes_service_account_v1.mosquitto[0].metadata[0].name
        automount_service_account_token = false

        security_context {
          run_as_non_root        = true
          run_as_user            = 11883
          run_as_group           = 11883
          fs_group               = 11883
          fs_group_change_policy = "OnRootMismatch"
          seccomp_profile {
            type = "RuntimeDefault"
          }
        }

        container {
          name              = "mosquitto"
          image             = var.mosquitto_image
          image_pull_policy = "IfNotPresent"
          command           = ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]

          port {
            name           = "mqtt"
            container_port = 1883
            protocol       = "TCP"
          }
          liveness_probe {
            tcp_socket {
              port = "mqtt"
            }
            period_seconds    = 10
            timeout_seconds   = 3
            failure_threshold = 3
          }
          readiness_probe {
            tcp_socket {
              port = "mqtt"
            }
            period_seconds  = 5
            timeout_seconds = 3
          }
          resources {
            requests = {
              cpu    = "100m"
              memory = "64Mi"
            }
            limits = {
              cpu    = "1"
              memory = "512Mi"
            }
          }
          security_context {
            allow_privilege_escalation = false
            read_only_root_filesystem  = true
            privileged                 = false
            run_as_non_root            = true
            run_as_user                = 11883
            run_as_group               = 11883
            capabilities {
              drop = ["ALL"]
            }
            seccomp_profile {
              type = "RuntimeDefault"
            }
          }
          volume_mount {
            name       = "config"
            mount_path = "/mosquitto/config"
            read_only  = true
          }
          volume_mount {
            name       = "passwd"
            mount_path = "/mosquitto/secrets"
            read_only  = true
          }
          volume_mount {
            name       = "data"
            mount_path = "/mosquitto/data"
          }
        }

        volume {
          name = "config"
          config_map {
            name = kubernetes_config_map_v1.mosquitto[0].metadata[0].name
          }
        }
        volume {
          name = "passwd"
          secret {
            secret_name  = kubernetes_secret_v1.mosquitto_passwd[0].metadata[0].name
            default_mode = "0440"
          }
        }
        volume {
          name = "data"
          persistent_volume_claim {
            claim_name = kubernetes_persistent_volume_claim_v1.mosquitto[0].metadata[0].name
          }
        }
      }
    }
  }
}

resource "kubernetes_service_v1" "mosquitto" {
  count = local.mosquitto ? 1 : 0
  metadata {
    name      = "mosquitto"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.mosquitto_labels
  }
  spec {
    type     = var.service_type
    selector = { "app.kubernetes.io/name" = "mosquitto" }
    port {
      name        = "mqtt"
      port        = 1883
      target_port = "mqtt"
      protocol    = "TCP"
    }
  }
  wait_for_load_balancer = var.service_type == "LoadBalancer"
}

resource "kubernetes_pod_disruption_budget_v1" "mosquitto" {
  count = local.mosquitto ? 1 : 0
  metadata {
    name      = "mosquitto"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.mosquitto_labels
  }
  spec {
    max_unavailable = "1"
    selector {
      match_labels = { "app.kubernetes.io/name" = "mosquitto" }
    }
  }
}

# --- ingress: only the API port and the MQTT port ----------------------------------------------

resource "kubernetes_network_policy_v1" "default_deny" {
  metadata {
    name      = "default-deny-ingress"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.labels
  }
  spec {
    pod_selector {}
    policy_types = ["Ingress"]
  }
}

resource "kubernetes_network_policy_v1" "fleet_api" {
  metadata {
    name      = "outpost-fleet-api"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.fleet_labels
  }
  spec {
    pod_selector {
      match_labels = { "app.kubernetes.io/name" = "outpost-fleet" }
    }
    policy_types = ["Ingress"]
    ingress {
      ports {
        port     = "7878"
        protocol = "TCP"
      }
    }
  }
}

resource "kubernetes_network_policy_v1" "mosquitto" {
  count = local.mosquitto ? 1 : 0
  metadata {
    name      = "mosquitto-mqtt"
    namespace = kubernetes_namespace_v1.outpost.metadata[0].name
    labels    = local.mosquitto_labels
  }
  spec {
    pod_selector {
      match_labels = { "app.kubernetes.io/name" = "mosquitto" }
    }
    policy_types = ["Ingress"]
    ingress {
      ports {
        port     = "1883"
        protocol = "TCP"
      }
    }
  }
}
