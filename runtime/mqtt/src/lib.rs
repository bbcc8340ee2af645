//! MQTT session.
