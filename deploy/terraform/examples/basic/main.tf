# An Outpost fleet with its own Mosquitto on the cluster of ~/.kube/config:
#   terraform init && terraform apply -var 'mosquitto_passwd_file=./mosquitto.passwd'
# mosquitto.passwd holds the fleet's login (mosquitto_passwd -c -b mosquitto.passwd
# fleet/primary PASSWORD, the same PASSWORD given as broker_password) and one line per
# enrolled device.

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.31"
    }
  }
}

provider "kubernetes" {
  config_path    = var.kubeconfig
  config_context = var.kube_context != "" ? var.kube_context : null
}

variable "kubeconfig" {
  description = "The kubeconfig of the cluster."
  type        = string
  default     = "~/.kube/config"
}

variable "kube_context" {
  description = "Its context (empty: the current one)."
  type        = string
  default     = ""
}

variable "mosquitto_passwd_file" {
  description = "Mosquitto's password file (mosquitto_passwd format)."
  type        = string
}

variable "broker_password" {
  description = "The password of fleet/primary in that file."
  type        = string
  sensitive   = true
}

variable "database_url" {
  description = "postgres://... once the PostgreSQL store is used; empty for the embedded store."
  type        = string
  default     = ""
  sensitive   = true
}

module "outpost" {
  source = "../.."

  namespace        = "outpost"
  image            = "ghcr.io/outpost-edge/outpost-fleet:0.1.0"
  replicas         = 1
  database_url     = var.database_url
  broker_password  = var.broker_password
  mosquitto_passwd = file(var.mosquitto_passwd_file)
  storage_size     = "20Gi"
  service_type     = "LoadBalancer"
  public_url       = "http://fleet.example.com:7878"
}

output "api_address" {
  description = "The fleet API inside the cluster."
  value       = module.outpost.api_address
}

output "api_external_address" {
  description = "The fleet API's LoadBalancer address."
  value       = module.outpost.api_external_address
}

output "api_token" {
  description = "The fleet API's bearer token."
  value       = module.outpost.api_token
  sensitive   = true
}
