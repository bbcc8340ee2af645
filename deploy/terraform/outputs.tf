output "api_address" {
  description = "The fleet API and artifacts inside the cluster (http://SERVICE.NAMESPACE.svc:7878)."
  value       = "http://${local.service_address}"
}

output "api_external_address" {
  description = "The fleet API's LoadBalancer address (IP or host name) when service_type is LoadBalancer, else null."
  value = var.service_type == "LoadBalancer" ? try(
    coalesce(
      kubernetes_service_v1.fleet.status[0].load_balancer[0].ingress[0].hostname,
      kubernetes_service_v1.fleet.status[0].load_balancer[0].ingress[0].ip,
    ), null
  ) : null
}

output "public_url" {
  description = "The artifact base URL devices are given (`fleet serve --public-url`)."
  value       = local.public_url
}

output "broker" {
  description = "The broker the fleet uses: the in-namespace Mosquitto, or var.broker."
  value       = local.broker
}

output "namespace" {
  description = "The namespace everything is in."
  value       = kubernetes_namespace_v1.outpost.metadata[0].name
}

output "api_token" {
  description = "The bearer token of the fleet API (outpost fleet ... --token, or OUTPOST_FLEET_TOKEN)."
  value       = local.api_token
  sensitive   = true
}

output "broker_password" {
  description = "The password of the fleet's broker login (to add to the broker's password file)."
  value       = local.broker_password
  sensitive   = true
}
