//! Microsoft Graph cloud communications: id normalisation, the `commsNotifications`
//! decoder, app-only tokens, and the `cancelMediaProcessing` client.

pub mod client;
pub mod ids;
pub mod notifications;
pub mod token;
