//! A record as an AMQP message, and back.
//!
//! The body is the record's JSON (the same encoding as the spool's frames and the HTTP
//! API), so every version of the program that reads one reads the other. The message
//! is persistent (delivery mode 2); its `message_id` is the `interaction_id`, so a
//! broker's tools show which record a message is; its `type` names the format, so a
//! later format can be told apart.

use lapin::types::ShortString;
use lapin::BasicProperties;

use crate::model::Interaction;

/// The `type` property of a record message (format version 1: the record's JSON).
pub const MESSAGE_TYPE: &str = "opsagent-audit.interaction.v1";
/// AMQP delivery mode of a message the broker keeps on disk.
const PERSISTENT: u8 = 2;

/// Why a message is not a record.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The message says it is in another format.
    #[error("message type `{0}` is not `{MESSAGE_TYPE}`")]
    Type(String),
    /// The body is not a record's JSON.
    #[error("body is not an audit record: {0}")]
    Body(#[from] serde_json::Error),
}

/// The body of a record's message.
pub fn encode(record: &Interaction) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(record)
}

/// The properties of a record's message.
pub fn properties(record: &Interaction) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(ShortString::from("application/json"))
        .with_type(ShortString::from(MESSAGE_TYPE))
        .with_message_id(ShortString::from(record.interaction_id.to_string()))
}

/// The record a message carries. A message without a `type` is read as version 1
/// (someone publishing records by hand need not know the property).
pub fn decode(properties: &BasicProperties, body: &[u8]) -> Result<Interaction, DecodeError> {
    if let Some(kind) = properties.kind() {
        if kind.as_str() != MESSAGE_TYPE {
            return Err(DecodeError::Type(kind.as_str().to_owned()));
        }
    }
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_round_trip() {
        let record = Interaction::new("why?");
        let props = properties(&record);
        let back = decode(&props, &encode(&record).unwrap()).unwrap();
        assert_eq!(back.interaction_id, record.interaction_id);
        assert_eq!(back.question, "why?");
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str().to_owned()), Some(record.interaction_id.to_string()));
    }

    #[test]
    fn other_formats_and_garbage_are_refused() {
        let other = BasicProperties::default().with_type(ShortString::from("something.else"));
        assert!(matches!(decode(&other, b"{}"), Err(DecodeError::Type(_))));
        assert!(matches!(decode(&BasicProperties::default(), b"not json"), Err(DecodeError::Body(_))));
    }
}
