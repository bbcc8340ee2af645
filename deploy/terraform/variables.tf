variable "namespace" {
  description = "Namespace to create and deploy into."
  type        = string
  default     = "outpost"
}

variable "image" {
  description = "The fleet manager's image (deploy/container/build.sh fleet), by tag or digest."
  type        = string
  default     = "ghcr.io/outpost-edge/outpost-fleet:0.1.0"
}

variable "replicas" {
  description = "Fleet manager replicas. More than 1 needs database_url: the embedded store is a single-writer database on a ReadWriteOnce volume."
  type        = number
  default     = 1

  validation {
    condition     = var.replicas >= 1 && floor(var.replicas) == var.replicas
    error_message = "replicas is a whole number, at least 1."
  }
}

variable "database_url" {
  description = "postgres://USER:PASSWORD@HOST/DB for `fleet serve --database` (read from OUTPOST_DATABASE_URL). Empty: the embedded store on the data volume."
  type        = string
  default     = ""
  sensitive   = true
}

variable "broker" {
  description = "An external MQTT broker (mqtt://HOST:1883 or mqtts://HOST:8883) for the fleet. Empty: Mosquitto is deployed in the namespace and used."
  type        = string
  default     = ""
}

variable "broker_username" {
  description = "The fleet's broker login (the Mosquitto ACL of docs/mosquitto/ grants fleet/primary everything under outpost/v1)."
  type        = string
  default     = "fleet/primary"
}

variable "broker_password" {
  description = "The password of broker_username. Empty: one is generated (and must then be in the broker's password file: see mosquitto_passwd)."
  type        = string
  default     = ""
  sensitive   = true
}

variable "mosquitto_passwd" {
  description = "The in-namespace Mosquitto's password file (mosquitto_passwd format): the fleet's login and one per enrolled device. Required when broker is empty."
  type        = string
  default     = ""
  sensitive   = true
}

variable "mosquitto_image" {
  description = "Mosquitto 2.x image, when broker is empty."
  type        = string
  default     = "docker.io/library/eclipse-mosquitto:2.0.20"
}

variable "api_token" {
  description = "The bearer token the fleet API requires. Empty: one is generated (output api_token)."
  type        = string
  default     = ""
  sensitive   = true
}

variable "public_url" {
  description = "The base URL devices use to download artifacts (`fleet serve --public-url`). Empty: the in-cluster Service address."
  type        = string
  default     = ""
}

variable "storage_size" {
  description = "Size of the fleet's data volume (database, artifact store, signing key)."
  type        = string
  default     = "10Gi"
}

variable "storage_class" {
  description = "StorageClass of the volumes. Empty: the cluster's default."
  type        = string
  default     = ""
}

variable "service_type" {
  description = "Type of the fleet's and the broker's Services: ClusterIP, or LoadBalancer for devices outside the cluster."
  type        = string
  default     = "ClusterIP"

  validation {
    condition     = contains(["ClusterIP", "LoadBalancer", "NodePort"], var.service_type)
    error_message = "service_type is ClusterIP, LoadBalancer or NodePort."
  }
}

variable "resources" {
  description = "The fleet container's requests and limits."
  type = object({
    requests_cpu    = string
    requests_memory = string
    limits_cpu      = string
    limits_memory   = string
  })
  default = {
    requests_cpu    = "250m"
    requests_memory = "256Mi"
    limits_cpu      = "2"
    limits_memory   = "2Gi"
  }
}
