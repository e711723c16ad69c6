// A chat screen that runs a gemma-edge model on an Android phone's CPU with Google's
// LiteRT-LM runtime (com.google.ai.edge.litertlm). NOT BUILT HERE: see README.md beside this
// file for the Gradle setup and for pushing the model to the device.
//
// The model is the .litertlm that `gemma-edge pack gemma3-270m-int8.tflite` writes: the
// .tflite unchanged, its tokenizer, and LiteRT-LM metadata (start/stop tokens, context
// length, the Gemma chat template, a greedy default sampler). Nothing else is needed.
package dev.gemmaedge.sample

import android.os.Bundle
import android.view.View
import android.view.ViewGroup.LayoutParams.MATCH_PARENT
import android.view.ViewGroup.LayoutParams.WRAP_CONTENT
import android.view.inputmethod.EditorInfo
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import androidx.activity.ComponentActivity
import androidx.lifecycle.lifecycleScope
import com.google.ai.edge.litertlm.Backend
import com.google.ai.edge.litertlm.Conversation
import com.google.ai.edge.litertlm.Engine
import com.google.ai.edge.litertlm.EngineConfig
import java.io.File
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.isActive
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext

/** The file `gemma-edge pack gemma3-270m-int8.tflite` writes; README.md says where to push it. */
private const val MODEL_FILE = "gemma3-270m-int8.litertlm"

class MainActivity : ComponentActivity() {
    private var engine: Engine? = null
    private var conversation: Conversation? = null // one for the activity's life: turns prefill only what is new

    private lateinit var scroll: ScrollView
    private lateinit var transcript: TextView
    private lateinit var input: EditText
    private lateinit var send: Button
    private lateinit var stop: Button

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        buildUi()
        // adb push puts it in the app's external files dir; `run-as ... cp` in its internal one
        val model = listOfNotNull(getExternalFilesDir(null), filesDir).map { File(it, MODEL_FILE) }
            .firstOrNull { it.exists() }
        if (model == null) {
            show("No $MODEL_FILE yet. Push it with\n  adb push $MODEL_FILE ${getExternalFilesDir(null)}/\n" +
                "then start the app again.")
            return
        }
        show("Loading ${model.name} (${model.length() / 1_000_000} MB)...\n")
        lifecycleScope.launch {
            try {
                val loaded = withContext(Dispatchers.IO) { // seconds of work: never on the main thread
                    Engine(EngineConfig(modelPath = model.path, backend = Backend.CPU(), cacheDir = cacheDir.path))
                        .also { it.initialize() }
                }
                engine = loaded
                conversation = loaded.createConversation() // the file's own sampler: greedy
                send.isEnabled = true
                show("Ready.\n\n")
            } catch (e: Exception) {
                show("Could not load ${model.path}: ${e.message}\n")
            }
        }
    }

    private fun sendMessage() {
        val chat = conversation ?: return
        val text = input.text.toString().trim()
        if (text.isEmpty() || stop.isEnabled) return
        input.text.clear()
        show("You: $text\nGemma: ")
        setBusy(true)
        lifecycleScope.launch { // collected on the main thread: each piece goes straight to the view
            try {
                chat.sendMessageAsync(text).collect { piece -> show(piece.toString()) }
            } catch (e: CancellationException) {
                if (!isActive) throw e // the activity is going away
                show(" [stopped]") // Stop: cancelProcess() ends the flow with a CancellationException
            } catch (e: Exception) {
                show("\n[${e.message}]")
            } finally {
                show("\n\n")
                setBusy(false)
            }
        }
    }

    private fun setBusy(busy: Boolean) {
        send.isEnabled = !busy
        stop.isEnabled = busy
    }

    private fun show(text: String) {
        transcript.append(text)
        scroll.post { scroll.fullScroll(View.FOCUS_DOWN) }
    }

    private fun buildUi() {
        transcript = TextView(this).apply { textSize = 16f; setTextIsSelectable(true) }
        scroll = ScrollView(this).apply { addView(transcript) }
        input = EditText(this).apply {
            hint = "Message"
            setSingleLine()
            imeOptions = EditorInfo.IME_ACTION_SEND
            setOnEditorActionListener { _, _, _ -> sendMessage(); true }
        }
        send = Button(this).apply { text = "Send"; isEnabled = false; setOnClickListener { sendMessage() } }
        stop = Button(this).apply { text = "Stop"; isEnabled = false; setOnClickListener { conversation?.cancelProcess() } }
        val row = LinearLayout(this).apply {
            orientation = LinearLayout.HORIZONTAL
            addView(input, LinearLayout.LayoutParams(0, WRAP_CONTENT, 1f))
            addView(send)
            addView(stop)
        }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            fitsSystemWindows = true
            setPadding(24, 24, 24, 24)
            addView(scroll, LinearLayout.LayoutParams(MATCH_PARENT, 0, 1f))
            addView(row)
        })
    }

    override fun onDestroy() {
        conversation?.run { cancelProcess(); close() }
        engine?.close()
        super.onDestroy()
    }
}
